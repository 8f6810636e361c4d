"""Store over a local folder and over S3 (moto on 127.0.0.1, real boto3 and pyarrow).

Outages are real: the session's moto server is stopped (connections refused, open ones cut) and
started again on the same port with its data (tests/s3_fixtures.py).
"""

from __future__ import annotations

import errno
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_fixtures import s3_outage

from vits_ray.config import ConfigError, StorageConfig, load_config
from vits_ray.data.reader import ShardSource
from vits_ray.data.shards import write_shard
from vits_ray.retry import RetriesExhausted, RetryPolicy, is_transient, with_retries
from vits_ray.storage import LocalStore, S3Store, StorageError, open_store

# Short backoff so a test waits about as long as its outage, not a doubled 30 s step.
FAST_RETRY = dict(retry_initial_seconds=0.2, retry_max_backoff_seconds=1.0)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    return open_store(request.getfixturevalue("s3_uri"))


def test_open_store_kinds(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}").uri == str(tmp_path)
    s3 = open_store("s3://bucket/a/b/", StorageConfig(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    assert s3.url("x/y.json") == "s3://bucket/a/b/x/y.json"
    assert s3.child("c").url("d") == "s3://bucket/a/b/c/d"
    with pytest.raises(ValueError, match="scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match=r"\.\."):
        s3.url("../escape")


def test_write_read_list_exists_delete(store):
    store.write_bytes("a.txt", b"A")
    store.write_bytes("dir/b.bin", b"B" * 1000)
    store.write_bytes("dir/sub/c", b"")
    store.write_bytes("dir2/d", b"D")
    assert store.read_bytes("a.txt") == b"A"
    assert store.read_bytes("dir/b.bin") == b"B" * 1000
    assert store.read_bytes("dir/sub/c") == b""
    assert store.list() == ["a.txt", "dir/b.bin", "dir/sub/c", "dir2/d"]
    assert store.list("dir") == ["dir/b.bin", "dir/sub/c"]  # not dir2/
    assert store.child("dir").list() == ["b.bin", "sub/c"]
    assert store.child("dir").read_bytes("sub/c") == b""
    assert store.exists("a.txt") and not store.exists("nope") and not store.exists("dir")
    store.write_bytes("a.txt", b"A2")
    assert store.read_bytes("a.txt") == b"A2"
    store.delete("a.txt")
    store.delete("a.txt")  # deleting a missing key is not an error
    assert not store.exists("a.txt")
    store.delete_prefix("dir")
    assert store.list() == ["dir2/d"]


def test_missing_key_error_names_uri(store):
    with pytest.raises(StorageError, match="missing.json not found") as info:
        store.read_bytes("missing.json")
    assert store.url("missing.json") in str(info.value)


def test_failed_write_leaves_previous_object(store):
    store.write_bytes("obj", b"old")
    with pytest.raises(RuntimeError, match="producer failed"):
        with store.open_write("obj") as f:
            f.write(b"half of the new cont")
            raise RuntimeError("producer failed")
    assert store.read_bytes("obj") == b"old"
    assert store.list() == ["obj"]  # no temporary file left behind
    with store.open_write("obj") as f:
        f.write(b"new")
    assert store.read_bytes("obj") == b"new"


def test_local_write_into_unwritable_place(tmp_path):
    (tmp_path / "blocker").write_bytes(b"a file, not a folder")
    store = open_store(str(tmp_path))
    with pytest.raises(StorageError, match="blocker"):
        store.write_bytes("blocker/x", b"data")
    assert (tmp_path / "blocker").read_bytes() == b"a file, not a folder"
    with pytest.raises(StorageError, match="blocker"):
        store.child("blocker").check()


def test_s3_write_into_missing_bucket(s3_server):
    store = open_store("s3://no-such-bucket-for-writes/p")
    with pytest.raises(StorageError, match="no-such-bucket-for-writes"):
        store.write_bytes("x", b"data")


def test_upload_download_dirs(store, tmp_path):
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "top.txt").write_bytes(b"top")
    (src / "nested" / "n.bin").write_bytes(bytes(range(256)) * 100)
    (src / "nested" / "deeper" / "d").write_bytes(b"d")
    store.upload_dir(src, "ckpt/step_1")
    assert store.list("ckpt") == ["ckpt/step_1/nested/deeper/d", "ckpt/step_1/nested/n.bin", "ckpt/step_1/top.txt"]
    dst = tmp_path / "dst"
    store.download_dir("ckpt/step_1", dst)
    got = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert got == ["nested/deeper/d", "nested/n.bin", "top.txt"]
    for rel in got:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()


def test_download_missing_leaves_local_file(store, tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"previous")
    with pytest.raises(StorageError, match="not found"):
        store.download_file("missing", target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")] == []


def test_arrow_filesystem_round_trip(store):
    fs, base = store.arrow_filesystem()
    table = pa.table({"id": ["a", "b"], "n": pa.array([1, 2], pa.int64())})
    fs.create_dir(f"{base}/tables", recursive=True)
    pq.write_table(table, f"{base}/tables/t.parquet", filesystem=fs)
    data = store.read_bytes("tables/t.parquet")
    assert pq.read_table(pa.BufferReader(data)).equals(table)
    store.write_bytes("raw.bin", b"via store")
    with fs.open_input_stream(f"{base}/raw.bin") as f:
        assert f.read() == b"via store"


def test_check(store):
    store.check()


def test_s3_check_missing_bucket_names_it(s3_server):
    store = open_store("s3://bucket-that-does-not-exist/prefix")
    with pytest.raises(StorageError, match="bucket-that-does-not-exist"):
        store.check()


def test_s3_check_unreachable_endpoint():
    store = open_store("s3://b/p", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StorageError, match="cannot reach bucket 'b'"):
        store.check()


def test_s3_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert open_store("s3://b").endpoint_url == "http://127.0.0.1:1111"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2222")
    assert open_store("s3://b").endpoint_url == "http://127.0.0.1:2222"
    assert open_store("s3://b", StorageConfig(endpoint_url="http://127.0.0.1:3333")).endpoint_url == \
        "http://127.0.0.1:3333"
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert open_store("s3://b").region == "us-east-1"
    assert open_store("s3://b", StorageConfig(region="eu-west-1")).region == "eu-west-1"


def test_repr_and_pickle_hold_no_secret(s3_uri, monkeypatch):
    secret = "SUPER-secret-value-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store(s3_uri)
    store.write_bytes("x", b"1")  # the client exists (and holds the secret) now
    fs, _ = store.arrow_filesystem()
    assert secret not in repr(store) and secret not in str(store)
    assert secret.encode() not in pickle.dumps(store)
    copy = pickle.loads(pickle.dumps(store))
    assert copy.read_bytes("x") == b"1"
    assert secret not in repr(fs)


# --- riding out outages ------------------------------------------------------------------------

def test_s3_operations_ride_out_an_outage(s3_uri, tmp_path, capsys):
    store = open_store(s3_uri, StorageConfig(retry_seconds=20, **FAST_RETRY))
    before = os.urandom(1 << 20)
    store.write_bytes("before.bin", before)
    shard = write_shard(store, "train", 0, _shard_rows(0))
    source = ShardSource(store, [shard], str(tmp_path / "cache"))
    written, spooled = os.urandom(1 << 20), os.urandom(300_000)
    (tmp_path / "upload.bin").write_bytes(spooled)

    def open_write() -> None:
        with store.open_write("spooled.bin") as f:
            f.write(spooled)

    operations = {
        "read": lambda: store.read_bytes("before.bin"),
        "write": lambda: store.write_bytes("during.bin", written),
        "open_write": open_write,
        "upload": lambda: store.upload_file(tmp_path / "upload.bin", "uploaded.bin"),
        "download": lambda: store.download_file("before.bin", tmp_path / "downloaded.bin"),
        "exists": lambda: store.exists("before.bin"),
        "list": lambda: store.list(),
        "lengths via pyarrow": lambda: source.lengths(0),
        "shard via cache": lambda: source.read(0),
    }
    with ThreadPoolExecutor(len(operations)) as pool:
        with s3_outage():
            started = time.monotonic()
            futures = {name: pool.submit(op) for name, op in operations.items()}
            time.sleep(3.0)
            assert not any(f.done() for f in futures.values()), "an operation gave up during a 3 s outage"
        results = {name: f.result(timeout=30) for name, f in futures.items()}
    assert time.monotonic() - started < 15
    assert results["read"] == before and results["exists"] is True
    assert store.read_bytes("during.bin") == written  # intact, and exactly one object per key
    assert store.read_bytes("spooled.bin") == spooled == store.read_bytes("uploaded.bin")
    assert (tmp_path / "downloaded.bin").read_bytes() == before
    # The listing races the writes that recover beside it; what was there before must be in it.
    assert {"before.bin", "shards/train-00000.parquet"} <= set(results["list"])
    assert list(results["lengths via pyarrow"]) == _shard_rows(0)["num_samples"]
    assert results["shard via cache"].column("id").to_pylist() == _shard_rows(0)["id"]
    assert store.list() == ["before.bin", "during.bin", "shards/train-00000.parquet", "spooled.bin",
                            "uploaded.bin"]
    log = capsys.readouterr().err
    # One line when an operation starts failing and one when it recovers, not one per attempt.
    assert log.count(f"storage {store.url('during.bin')}: write failed") == 1
    assert "retrying for up to 20 s" in log and "succeeded after" in log


def test_s3_gives_up_after_the_retry_window_naming_the_uri(s3_uri):
    store = open_store(s3_uri, StorageConfig(retry_seconds=2, **FAST_RETRY))
    store.write_bytes("k", b"v")
    with s3_outage():
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.read_bytes("k")
        elapsed = time.monotonic() - started
    # botocore's own 3 quick attempts may run past the window once; nothing waits minutes.
    assert 2.0 <= elapsed < 10.0
    message = str(info.value)
    assert message.startswith(f"{store.url('k')}: read failed after retrying for ")
    assert "attempts); last error: EndpointConnectionError" in message
    assert store.read_bytes("k") == b"v"  # the server is back


def test_no_retries_with_a_zero_window(s3_uri):
    store = open_store(s3_uri, StorageConfig(retry_seconds=0))
    with s3_outage():
        started = time.monotonic()
        with pytest.raises(StorageError, match="no retries: storage.retry_seconds is 0"):
            store.write_bytes("k", b"v")
    assert time.monotonic() - started < 5.0


def test_permanent_errors_fail_at_once(store, tmp_path, s3_server):
    # The default window is minutes; a missing key or bucket must not wait for any of it.
    started = time.monotonic()
    with pytest.raises(StorageError, match="not found"):
        store.read_bytes("missing")
    with pytest.raises(StorageError, match="not found"):
        store.download_file("missing", tmp_path / "x")
    assert store.exists("missing") is False
    with pytest.raises(StorageError, match="does not exist"):
        open_store("s3://no-such-bucket-for-retries/p").read_bytes("k")
    assert time.monotonic() - started < 5.0


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _botocore_error(name: str, **kwargs):
    import botocore.exceptions

    return getattr(botocore.exceptions, name)(**kwargs)


@pytest.mark.parametrize("make_error,transient", [
    (lambda: _client_error("NoSuchKey", 404), False),
    (lambda: _client_error("NoSuchBucket", 404), False),
    (lambda: _client_error("AccessDenied", 403), False),
    (lambda: _client_error("InvalidAccessKeyId", 403), False),
    (lambda: _client_error("SignatureDoesNotMatch", 403), False),
    (lambda: _client_error("SlowDown", 503), True),
    (lambda: _client_error("InternalError", 500), True),
    (lambda: _client_error("RequestTimeout", 400), True),
    (lambda: _botocore_error("EndpointConnectionError", endpoint_url="http://x"), True),
    (lambda: _botocore_error("ReadTimeoutError", endpoint_url="http://x"), True),
    (lambda: _botocore_error("NoCredentialsError"), False),
    (lambda: OSError(errno.EIO, "I/O error"), True),
    (lambda: OSError(errno.ESTALE, "stale handle"), True),
    (lambda: FileNotFoundError(errno.ENOENT, "missing"), False),
    (lambda: PermissionError(errno.EACCES, "denied"), False),
    (lambda: OSError(errno.ENOSPC, "full"), False),
    (lambda: OSError("When reading 'k': AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7"),
     True),
    (lambda: OSError("When reading 'k': AWS Error ACCESS_DENIED during GetObject operation"), False),
    (lambda: OSError("Couldn't deserialize thrift: TProtocolException: Invalid data"), False),
    (lambda: ValueError("relative key '../x' must not contain '..'"), False),
])
def test_which_errors_are_transient(make_error, transient):
    assert is_transient(make_error()) is transient


def test_with_retries_backs_off_then_succeeds_or_gives_up():
    failures = []

    def flaky():
        if len(failures) < 3:
            failures.append(time.monotonic())
            raise OSError(errno.EIO, "mount hiccup")
        return "ok"

    policy = RetryPolicy(seconds=10, initial_seconds=0.05, max_backoff_seconds=0.2)
    assert with_retries(flaky, what="read", url="/data/x", policy=policy) == "ok"
    gaps = np.diff(failures)
    assert all(0.02 <= g <= 0.3 for g in gaps)  # backoff with jitter, capped

    def broken():
        raise OSError(errno.ETIMEDOUT, "timed out")
    started = time.monotonic()
    with pytest.raises(RetriesExhausted, match=r"/data/x: write failed after retrying for \d+ s \(\d+ attempts\)"):
        with_retries(broken, what="write", url="/data/x", policy=RetryPolicy(0.5, 0.05, 0.1))
    assert 0.5 <= time.monotonic() - started < 2.0
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(PermissionError):  # permanent: raised unchanged, the first time
        with_retries(denied, what="read", url="/data/x", policy=policy)
    assert calls == [1]


def test_retry_config_is_validated():
    assert load_config("tiny", ["storage.retry_seconds=0"]).storage.retry_seconds == 0
    with pytest.raises(ConfigError, match="storage.retry_seconds"):
        load_config("tiny", ["storage.retry_seconds=-1"])
    with pytest.raises(ConfigError, match="storage.retry_max_backoff_seconds"):
        load_config("tiny", ["storage.retry_initial_seconds=5", "storage.retry_max_backoff_seconds=1"])
    with pytest.raises(ConfigError, match="data.cache_max_gb"):
        load_config("tiny", ["data.cache_max_gb=0"])


# --- credentials ---------------------------------------------------------------------------

def test_arrow_filesystem_carries_no_credentials(s3_uri, monkeypatch):
    secret, token = "DISTINCTIVE-secret-4f9a1c", "DISTINCTIVE-session-token-7b2e"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    store = open_store(s3_uri)
    store.write_bytes("x", b"1")  # the boto3 client exists (and holds the keys) now
    fs, base = store.arrow_filesystem()
    for blob in (pickle.dumps(fs), pickle.dumps(store), pickle.dumps(store.arrow_filesystem())):
        assert secret.encode() not in blob and token.encode() not in blob
    # Signed requests (not anonymous) with keys the AWS SDK resolves itself, from the environment here.
    options = fs.__reduce__()[1][0]
    assert options["anonymous"] is False and options["secret_key"] is None and options["session_token"] is None
    table = pa.table({"n": pa.array([1, 2, 3], pa.int64())})
    copy = pickle.loads(pickle.dumps(fs))  # what a Ray worker gets
    pq.write_table(table, f"{base}/t.parquet", filesystem=copy)
    assert pq.read_table(f"{base}/t.parquet", filesystem=fs).equals(table)
    assert pq.read_table(pa.BufferReader(store.read_bytes("t.parquet"))).equals(table)


def test_arrow_filesystem_is_anonymous_without_credentials(s3_server, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe
    fs, _ = open_store("s3://public-bucket/p").arrow_filesystem()
    assert fs.__reduce__()[1][0]["anonymous"] is True


# --- shard cache ---------------------------------------------------------------------------

def _shard_rows(index: int, n: int = 4) -> dict[str, list]:
    rng = np.random.default_rng(index)
    return {
        "id": [f"s{index}-{i}" for i in range(n)], "speaker": ["spk"] * n, "text": ["t"] * n,
        "normalized_text": ["t"] * n, "token_ids": [[1, 2, 3]] * n, "num_samples": [8000 + i for i in range(n)],
        # Noise does not compress, so every shard has about the same size.
        "audio_pcm16": [rng.integers(-3000, 3000, 8000 + i, dtype="<i2").tobytes() for i in range(n)],
        "clipped_fraction": [0.0] * n,
    }


def _cache_files(folder) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}


def test_shard_cache_stays_under_its_bound_evicting_least_recently_used(s3_uri, tmp_path):
    store = open_store(s3_uri)
    entries = [write_shard(store, "train", i, _shard_rows(i)) for i in range(6)]
    size = max(e["bytes"] for e in entries)
    cache = tmp_path / "cache"
    source = ShardSource(store, entries, str(cache), cache_max_bytes=int(2.5 * size))  # room for two
    names = [e["sha256"] + ".parquet" for e in entries]
    for index in (0, 1, 0, 2, 3, 4, 5, 1):
        assert source.read(index).column("id").to_pylist() == _shard_rows(index)["id"]
        assert sum(_cache_files(cache).values()) <= source.cache_max_bytes
        if index == 2:  # 0 was used after 1, so 1 went
            assert set(_cache_files(cache)) == {names[0], names[2]}
    assert set(_cache_files(cache)) == {names[5], names[1]}
    # A second reader of the folder (another worker) and an eviction behind a reader's back.
    other = ShardSource(store, entries, str(cache), cache_max_bytes=int(2.5 * size))
    assert other.read(5).column("id").to_pylist() == _shard_rows(5)["id"]  # a hit
    os.unlink(cache / names[1])
    assert source.read(1).column("id").to_pylist() == _shard_rows(1)["id"]  # fetched again
    # A shard bigger than the whole bound is served, but not cached.
    tiny = ShardSource(store, entries, str(tmp_path / "tiny"), cache_max_bytes=size // 2)
    assert tiny.read(3).column("id").to_pylist() == _shard_rows(3)["id"]
    assert _cache_files(tmp_path / "tiny") == {}
    # A given folder is meant to be reused: close() keeps it, and files that are not ours are never touched.
    (cache / "notes.txt").write_text("mine")
    source.close()
    for index in range(6):
        source.read(index)
    assert (cache / "notes.txt").read_text() == "mine" and len(_cache_files(cache)) == 3


def test_temporary_shard_cache_is_removed_on_close(s3_uri):
    store = open_store(s3_uri)
    entries = [write_shard(store, "train", 0, _shard_rows(0))]
    source = ShardSource(store, entries)
    source.read(0)
    folder = source.cache_dir
    assert os.listdir(folder) == [entries[0]["sha256"] + ".parquet"]
    source.close()
    assert not os.path.exists(folder)
    assert source.read(0).num_rows == 4  # still readable, uncached
    source.close()  # idempotent
    # Dropped without close(): the finalizer removes it too.
    dropped = ShardSource(store, entries)
    folder = dropped.cache_dir
    del dropped
    assert not os.path.exists(folder)


def test_ray_filesystem_rides_out_an_outage_and_pickles_without_keys(s3_uri):
    """Ray Train's controller writes its own files through this filesystem; a write that met an
    outage would end the run (controller errors are never retried)."""
    store = open_store(s3_uri, StorageConfig(retry_seconds=20, **FAST_RETRY))
    filesystem, base = store.ray_filesystem()
    filesystem = pickle.loads(pickle.dumps(filesystem))  # as Ray ships it to its controller
    path = f"{base}/ray/snapshot.json"
    store.write_bytes("ray/marker", b"")  # the listing races the write: what it lists must exist before
    with ThreadPoolExecutor(2) as pool:
        with s3_outage():
            def write() -> None:
                with filesystem.open_output_stream(path) as stream:
                    stream.write(b'{"checkpoints": 3}')
            writing = pool.submit(write)
            listing = pool.submit(lambda: filesystem.get_file_info(pa.fs.FileSelector(base, recursive=True)))
            time.sleep(2.0)
            assert not writing.done() and not listing.done()
        writing.result(timeout=30)
        listing.result(timeout=30)
    assert store.read_bytes("ray/snapshot.json") == b'{"checkpoints": 3}'
    with filesystem.open_input_stream(path) as stream:
        assert stream.read() == b'{"checkpoints": 3}'
    assert filesystem.get_file_info(path).size == len(b'{"checkpoints": 3}')
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(filesystem)
