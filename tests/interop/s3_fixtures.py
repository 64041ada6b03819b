"""moto's S3 server from PyPI on a free 127.0.0.1 port, as an operator's S3-compatible endpoint
(path-style, plain HTTP, dummy AWS_* credentials), for the tiering interop tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

MOTO_START_TIMEOUT = 60.0
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_answers(endpoint):
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Moto:
    """A running moto server: `endpoint` (http://127.0.0.1:PORT), `port`, and `env()`, the
    AWS_* variables a client of it needs."""

    def __init__(self, port, process):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = process

    def create_bucket(self, bucket):
        request = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def list_keys(self, bucket, prefix=""):
        """Every key under `prefix` (ListObjectsV2, following continuation tokens)."""
        keys, token = [], None
        namespace = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            url = f"{self.endpoint}/{bucket}?{urllib.parse.urlencode(query)}"
            with urllib.request.urlopen(url, timeout=30) as response:
                root = ET.fromstring(response.read())
            keys += [element.text for element in root.iter(f"{namespace}Key")]
            token_element = root.find(f"{namespace}NextContinuationToken")
            if token_element is None:
                return keys
            token = token_element.text

    def env(self):
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }


@contextlib.contextmanager
def moto_server(log_dir: Path):
    """Starts moto_server (next to this Python) and stops it on exit; its output goes to
    `log_dir/moto.log`, shown if it fails to start."""
    moto_bin = Path(sys.executable).parent / "moto_server"
    port = free_port()
    log_path = log_dir / "moto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            moto = Moto(port, process)
            deadline = time.monotonic() + MOTO_START_TIMEOUT
            while not moto_answers(moto.endpoint):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "moto_server did not answer in time"
                time.sleep(0.1)
            yield moto
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
