"""A real S3-compatible server on 127.0.0.1 (moto's standalone server, a subprocess) for the tests.

The code under test reaches it through s3fs exactly as it would reach AWS: the endpoint and the
credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which child
processes inherit; nothing in the client is patched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata endpoint for credentials
    "AWS_CONFIG_FILE": os.devnull,  # the developer's own ~/.aws stays out of the tests
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server started for this test session and stopped after it."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield wait_until_up(f"http://127.0.0.1:{port}", server, log)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_until_up(endpoint: str, server: subprocess.Popen, log: Any) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                output = log.read().decode(errors="replace")[-2000:]
                pytest.fail(f"the moto S3 server did not start: {output}")
            time.sleep(0.1)


def clear_s3fs_cache() -> None:
    """Forget s3fs instances, so the next one reads the environment (endpoint, credentials) afresh."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<a new empty bucket>`` on the test server; the environment points s3fs at it."""
    import s3fs

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    clear_s3fs_cache()
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    clear_s3fs_cache()


def s3fs_client():
    """An s3fs filesystem on the test server (what a user's own code would open), caches off."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def corrupt_object(url: str, offset: int) -> None:
    """Flip one byte of the object at ``url`` on the server (``offset`` from the end when negative)."""
    fs = s3fs_client()
    data = bytearray(fs.cat_file(url))
    data[offset] ^= 0xFF
    fs.pipe_file(url, bytes(data))
