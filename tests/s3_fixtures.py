"""A real S3-protocol server (moto) on 127.0.0.1 for tests: real boto3 and pyarrow, no patched clients.

tests/conftest.py imports them, so every test module gets the same session server.
"""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would point boto3 elsewhere (a real profile, another endpoint) are hidden.
_HIDE = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION")

_bucket_counter = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    """Start moto once per session; yield its endpoint URL (http://127.0.0.1:PORT)."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in (*_ENV, *_HIDE, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for name in _HIDE:
        os.environ.pop(name, None)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh, empty bucket on the moto server; returns s3://<bucket>/<prefix>."""
    import boto3

    bucket = f"test-{next(_bucket_counter)}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"
