"""Shared parts of the Kafka interop suites (test_kafka_*.py): the `silt-core` under test,
started on free loopback ports with its own data directory, and waits with deadlines.

The binary: SILT_CORE_BIN, or built now with cargo (once per run). Running, from the
repository root:
    .venv/bin/python -m pytest -q tests/interop -k kafka
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

WORKSPACE_ROOT = Path(__file__).resolve().parents[2]

# How long silt-core gets to start or stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

_silt_core = None


def silt_core_binary():
    """Path of silt-core: SILT_CORE_BIN, or built now with cargo (once per run)."""
    global _silt_core
    if _silt_core is not None:
        return _silt_core
    prebuilt = os.environ.get("SILT_CORE_BIN")
    if prebuilt:
        _silt_core = prebuilt
        return prebuilt
    build = subprocess.run(
        ["cargo", "build", "-p", "silt-core", "--bin", "silt-core",
         "--message-format=json-render-diagnostics"],
        cwd=WORKSPACE_ROOT, stdout=subprocess.PIPE, check=True,
    )
    for line in build.stdout.decode().splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "silt-core":
            _silt_core = message["executable"]
            return _silt_core
    raise AssertionError("cargo build did not report a silt-core executable")


def wait_until(condition, timeout, what):
    """Polls `condition` until it returns a true value, which it returns; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Core:
    """A running silt-core. `bootstrap` is its Kafka address; `restart()` keeps the data.
    `env` adds environment variables (e.g. an object store's AWS_* settings, or RUST_LOG)."""

    def __init__(self, data_dir: Path, *extra: str, env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.extra = list(extra)
        self.env = dict(env or {})
        self.process = None
        self.kafka_port = None
        self.start()

    def start(self):
        # The Kafka port is kept across restarts so clients can reconnect to the same address.
        listen = f"127.0.0.1:{self.kafka_port or 0}"
        env = {name: value for name, value in os.environ.items() if not name.startswith("SILT_")}
        env["RUST_LOG"] = "info"
        env.update(self.env)
        self.process = subprocess.Popen(
            [silt_core_binary(), "--data-dir", str(self.data_dir),
             "--admin-listen", "127.0.0.1:0", "--kafka-listen", listen,
             "--uplink-listen", "127.0.0.1:0",
             # Consumers in these tests join together; a short initial delay keeps them quick.
             "--set", "kafka.group_initial_rebalance_delay_ms=500", *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, text=True,
        )
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read_stderr, args=(self.process, self.lines),
                         daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError("silt-core did not start:\n" + "\n".join(self.stderr))
            if line is None:
                raise AssertionError("silt-core exited:\n" + "\n".join(self.stderr))
            if "silt-core started" in line:
                self.kafka_port = int(re.search(r"kafka=127\.0\.0\.1:(\d+)", line).group(1))
                self.admin_port = int(re.search(r"admin=127\.0\.0\.1:(\d+)", line).group(1))
                break
        wait_until(self._healthy, START_TIMEOUT, "silt-core /health")

    def _read_stderr(self, process, lines):
        for line in process.stderr:
            self.stderr.append(line.rstrip("\n"))
            lines.put(line)
        lines.put(None)

    def _healthy(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/health",
                                        timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def admin_get(self, path):
        """GET `path` on the admin port: (status, body text); error statuses are returned."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                        timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.kafka_port}"

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics",
                                    timeout=10) as response:
            return response.read().decode()

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=STOP_TIMEOUT)
        assert code == 0, "silt-core exit %s:\n%s" % (code, "\n".join(self.stderr))

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def restart(self, clean=True):
        self.stop() if clean else self.kill()
        self.start()
