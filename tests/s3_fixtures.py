"""A real S3-protocol server (moto) on 127.0.0.1 for tests: real boto3 and pyarrow, no patched clients.

tests/conftest.py imports the fixtures, so every test module gets the same session server.

Outages: `s3_outage()` stops the session server (new connections are refused, open ones are cut)
and starts it again on the same port when the block ends; moto keeps its buckets in module-global
backends, so the restarted server serves the same data. For an outage while something else runs
in the foreground (a Ray training run), `s3_outage_later(delay_s, duration_s)` does the same from
a background thread:

    from s3_fixtures import s3_outage, s3_outage_later

    def test_rides_out(s3_uri):
        with s3_outage():
            ...                                  # S3 is down here
        outage = s3_outage_later(2.0, 3.0)       # down from t+2 s to t+5 s
        run_something_long()
        outage.join()                            # the server is back (and errors, if any, raised)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator

import pytest

# Temporary credentials, as an instance role or SSO hands out; moto accepts any. The secret and the
# token are distinctive so that the secrets drill (tests/test_faults.py) can search every byte
# shipped to Ray, stored or logged for them: a match can only be a leak.
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "vitsray-test-secret-" + uuid.uuid4().hex,
    "AWS_SESSION_TOKEN": "vitsray-test-session-token-" + uuid.uuid4().hex,
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would point boto3 elsewhere (a real profile, another endpoint) are hidden.
_HIDE = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION")

_bucket_counter = itertools.count()


class MotoServer:
    """moto's S3 app on a werkzeug server thread that can be stopped and started on the same port.

    moto's ThreadedMotoServer.stop() leaves the listening socket open (connections hang instead of
    being refused) and keeps serving keep-alive connections boto3 has pooled, so an outage made
    with it is no outage. This one closes both, as a crashed or restarting endpoint would.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self._server = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        assert self._server is None, "already running"
        connections, lock = self._connections, self._lock

        class TrackedHandler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with lock:
                    connections.add(self.connection)

            def finish(self) -> None:
                with lock:
                    connections.discard(self.connection)
                super().finish()

        app = DomainDispatcherApplication(create_backend_app)
        # werkzeug's server sets SO_REUSEADDR, so the port of a stopped server can be bound again
        # although its closed connections linger in TIME_WAIT.
        self._server = make_server(self.host, self.port, app, threaded=True, request_handler=TrackedHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None, "not running"
        self._server.shutdown()
        self._server.server_close()  # refuse new connections from now on
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # cut the connections clients keep alive
        self._thread.join()
        self._server = self._thread = None


# The session's server, for s3_outage(); set by the s3_server fixture.
_server: MotoServer | None = None


@contextlib.contextmanager
def s3_outage() -> Iterator[None]:
    """S3 is down inside the block: connections refused, open ones cut; back on the same port after."""
    assert _server is not None and _server.running, "s3_outage needs the s3_server fixture (and no outage already)"
    _server.stop()
    try:
        yield
    finally:
        _server.start()


class _OutageThread(threading.Thread):
    def __init__(self, delay_s: float, duration_s: float):
        super().__init__(name="s3-outage", daemon=True)
        self.delay_s, self.duration_s = delay_s, duration_s
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(self.delay_s)
            with s3_outage():
                time.sleep(self.duration_s)
        except BaseException as err:  # surfaced by join() in the test's thread
            self.error = err

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def s3_outage_later(delay_s: float, duration_s: float) -> threading.Thread:
    """Start an outage `delay_s` from now lasting `duration_s`, in a background thread; join() it."""
    assert _server is not None, "s3_outage_later needs the s3_server fixture"
    thread = _OutageThread(delay_s, duration_s)
    thread.start()
    return thread


@pytest.fixture(scope="session")
def s3_server():
    """Start moto once per session; yield its endpoint URL (http://127.0.0.1:PORT)."""
    global _server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = MotoServer("127.0.0.1", 0)
    server.start()
    _server = server
    endpoint = server.endpoint
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
        _server = None
        if server.running:
            server.stop()


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh, empty bucket on the moto server; returns s3://<bucket>/<prefix>."""
    import boto3

    bucket = f"test-{next(_bucket_counter)}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"
