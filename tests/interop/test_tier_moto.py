"""The archive store conformance suite (tiering/tests/archive_conformance.rs) against moto's S3
server from PyPI: every case runs against memory, a directory and s3s-fs as under `cargo test`,
and also against moto, reached through `SILT_CONFORMANCE_S3` as an operator's S3-compatible
endpoint would be (path-style, plain HTTP, AWS_* credentials).

The test binary: SILT_TIER_CONFORMANCE_BIN, or built now with cargo (scripts/test has built the
workspace's tests already, so this is quick)."""

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

import s3_fixtures

WORKSPACE_ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_TIMEOUT = 600.0
BUCKET = "silt-conformance"


def conformance_binary():
    prebuilt = os.environ.get("SILT_TIER_CONFORMANCE_BIN")
    if prebuilt:
        return prebuilt
    build = subprocess.run(
        # --workspace, not -p silt-tiering: the workspace's unified features, so this reuses
        # what `cargo test --workspace` built instead of recompiling the dependencies.
        ["cargo", "test", "--workspace", "--test", "archive_conformance", "--no-run",
         "--message-format=json-render-diagnostics"],
        cwd=WORKSPACE_ROOT, stdout=subprocess.PIPE, check=True,
    )
    for line in build.stdout.decode().splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "archive_conformance":
            return message["executable"]
    raise AssertionError("cargo did not report the archive_conformance test executable")


@pytest.fixture
def moto(tmp_path):
    """A moto S3 server on a free 127.0.0.1 port with the conformance bucket; its endpoint."""
    with s3_fixtures.moto_server(tmp_path) as server:
        server.create_bucket(BUCKET)
        yield server.endpoint


def test_archive_conformance_suite_passes_against_moto(moto):
    env = dict(os.environ)
    env.update({
        "SILT_CONFORMANCE_S3": moto,
        "SILT_CONFORMANCE_S3_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": s3_fixtures.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": s3_fixtures.SECRET_KEY,
        "AWS_REGION": s3_fixtures.REGION,
    })
    env.pop("AWS_PROFILE", None)
    result = subprocess.run([conformance_binary(), "--test-threads=2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=CONFORMANCE_TIMEOUT)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output
    assert " 0 failed" in output and " passed" in output, output
    # The cases really reached moto: the suite's prefixes are in the bucket.
    with urllib.request.urlopen(f"{moto}/{BUCKET}?list-type=2", timeout=10) as response:
        listing = response.read().decode()
    assert "<Key>run-" in listing, listing[:2000]
