"""Store over a local folder and over S3 (moto on 127.0.0.1, real boto3 and pyarrow)."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vits_ray.config import StorageConfig
from vits_ray.storage import LocalStore, S3Store, StorageError, open_store


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
