"""A small storage interface over string URIs: a local folder or an `s3://bucket/prefix`.

`pathlib` turns `s3://b/k` into `s3:/b/k`, so everything that may live on S3 is addressed by
a `Store` (rooted at a URI) plus relative keys written with `/`. Writes are atomic: a local
write goes to a temporary file beside the target and is renamed over it; an S3 PUT replaces
the object in one step. A failed write therefore leaves the previous object as it was.

Every operation (but `check`) rides out outages: transient failures (endpoint unreachable,
throttling, 5xx, a network mount timing out) are retried with backoff for
`StorageConfig.retry_seconds` (see vits_ray/retry.py); a missing key or a denied permission fails
at once. Retrying is safe because every write is atomic and idempotent: an S3 PUT of the same
bytes, or a fresh local temporary file renamed into place.

S3 settings: the endpoint is `StorageConfig.endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else
`AWS_ENDPOINT_URL`, else AWS itself; credentials come from the standard AWS chain (boto3; pyarrow's
own AWS SDK chain for `arrow_filesystem`, which refreshes them). Credentials are never logged,
printed, stored in the manifest, shown by `repr` or carried by a pickled store or filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar

import pyarrow.fs as pafs

from vits_ray.config import StorageConfig
from vits_ray.retry import RetriesExhausted, RetryPolicy, is_transient, with_retries

T = TypeVar("T")

# A dead endpoint must fail fast into our backoff loop rather than hang in one connect attempt.
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 60


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what failed (never credentials)."""


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").strip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"relative key {rel!r} must not contain '..'")
    return "/".join(parts)


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a and b else a or b


def open_store(uri: str, cfg: StorageConfig | None = None) -> "Store":
    """A store rooted at `uri`: a local folder (plain path or file://) or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        return S3Store(bucket, _clean_rel(prefix), cfg or StorageConfig())
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: unsupported URI scheme (use a local path, file:// or s3://)")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not path:
        raise ValueError("empty storage path")
    return LocalStore(Path(path).expanduser().resolve(), cfg or StorageConfig())


class Store:
    """Common interface; see LocalStore and S3Store."""

    uri: str
    cfg: StorageConfig

    def retry(self, fn: Callable[[], T], what: str, rel: str = "",
              transient: Callable[[BaseException], bool] = is_transient) -> T:
        """`fn()` under this store's retry policy (`storage.retry_seconds`).

        For work on this store's data done outside its methods (pyarrow reads through
        `arrow_filesystem`). A permanent error is raised unchanged; a transient one that outlasts
        the window becomes a StorageError naming `url(rel)`, how long it retried and the last error.
        """
        try:
            return with_retries(fn, what=what, url=self.url(rel), policy=RetryPolicy.from_config(self.cfg),
                                transient=transient)
        except RetriesExhausted as err:
            raise StorageError(str(err)) from None

    def url(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    def child(self, rel: str) -> "Store":
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A binary file whose content becomes `rel` only if the block finishes without error."""
        raise NotImplementedError
        yield  # pragma: no cover

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        raise NotImplementedError

    def download_file(self, rel: str, local_path: str | Path) -> None:
        raise NotImplementedError

    def upload_dir(self, local_dir: str | Path, rel_prefix: str) -> None:
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.upload_file(path, _join(_clean_rel(rel_prefix), path.relative_to(local_dir).as_posix()))

    def download_dir(self, rel_prefix: str, local_dir: str | Path) -> None:
        rel_prefix = _clean_rel(rel_prefix)
        for key in self.list(rel_prefix):
            sub = key[len(rel_prefix):].lstrip("/") if rel_prefix else key
            self.download_file(key, Path(local_dir) / sub)

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        raise NotImplementedError

    def ray_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem for Ray Train's `RunConfig`: its controller writes through it (see
        `arrow_retry`), so on an object store its calls get this store's retry window."""
        return self.arrow_filesystem()

    def check(self) -> None:
        raise NotImplementedError


# --- local ------------------------------------------------------------------------------

class LocalStore(Store):
    def __init__(self, root: Path, cfg: StorageConfig | None = None):
        self.root = root
        self.uri = str(root)
        # Only the retry settings apply; a local folder may be a network mount (NFS, EFS, FUSE)
        # whose outages look like EIO/ESTALE/ETIMEDOUT and clear when it comes back.
        self.cfg = cfg or StorageConfig()

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, rel: str) -> Path:
        return self.root / _clean_rel(rel)

    def url(self, rel: str) -> str:
        return str(self._path(rel))

    def child(self, rel: str) -> "LocalStore":
        return LocalStore(self._path(rel), self.cfg)

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """`fn()` with transient OS errors retried; what still fails becomes a StorageError naming the path."""
        try:
            return self.retry(fn, what, rel)
        except FileNotFoundError as err:
            raise StorageError(f"{err.filename or self._path(rel)} not found") from None
        except OSError as err:
            raise StorageError(f"{self._path(rel)}: cannot {what}: {err.strerror or err}") from None

    def read_bytes(self, rel: str) -> bytes:
        return self._call("read", rel, self._path(rel).read_bytes)

    def write_bytes(self, rel: str, data: bytes) -> None:
        # The bytes are in memory, so a failed attempt is simply written again to a fresh temporary file.
        path = self._path(rel)
        self._call("write", rel, lambda: _atomic_local_write(path, lambda f: f.write(data), durable=True))

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        # The producer's block cannot run twice, so only the steps around it are retried: creating
        # the temporary file, and renaming it over the target once the block finished cleanly.
        path = self._path(rel)
        fd, tmp = self._call("write", rel, lambda: _temp_file_beside(path))
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            self._call("write", rel, lambda: _publish(tmp, path))
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise StorageError(f"{path}: cannot write: {err.strerror or err}") from None
            raise

    def exists(self, rel: str) -> bool:
        path = self._path(rel)

        def probe() -> bool:
            try:
                return stat.S_ISREG(os.stat(path).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                return False
        return self._call("check existence", rel, probe)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)

        def scan() -> list[str]:
            if base.is_file():
                return [_clean_rel(prefix)]
            if not base.is_dir():
                return []
            return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                          if p.is_file() and not p.name.endswith(".tmp"))
        return self._call("list", prefix, scan)

    def delete(self, rel: str) -> None:
        path = self._path(rel)

        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._call("delete", rel, unlink)

    def delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix)

        def remove() -> None:
            # A retry after a partial removal finds less to remove; both steps tolerate that.
            if base.is_dir():
                shutil.rmtree(base)
            elif base.exists():
                base.unlink()
        self._call("delete", prefix, remove)

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        path = self._path(rel)
        self._call(f"upload from {local_path}", rel,
                   lambda: _atomic_local_write(path, lambda dst: _copy_path(Path(local_path), dst), durable=True))

    def download_file(self, rel: str, local_path: str | Path) -> None:
        path = self._path(rel)

        def copy(dst: IO[bytes]) -> None:
            if not path.is_file():
                raise FileNotFoundError(errno.ENOENT, "not found", str(path))
            _copy_path(path, dst)
        self._call(f"download to {local_path}", rel, lambda: _atomic_local_write(Path(local_path), copy))

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)

    def check(self) -> None:
        # A preflight (job submission) is not retried: it should say at once what is wrong.
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{self.root}: cannot create folder: {err.strerror or err}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root}: folder is not writable")


def _copy_path(src: Path, dst: IO[bytes]) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst, 1 << 20)


def _temp_file_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _publish(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _atomic_local_write(path: Path, fill: Callable[[IO[bytes]], object], durable: bool = False) -> None:
    """`fill` writes a temporary file beside `path`, renamed over it only if `fill` succeeds.

    A failure removes the temporary file, so the attempt can simply be repeated. `durable` syncs
    the data before the rename, for files that must survive a crash of the machine.
    """
    fd, tmp = _temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- S3 ---------------------------------------------------------------------------------

def _endpoint(cfg: StorageConfig) -> str:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def _region(cfg: StorageConfig) -> str:
    return cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, cfg: StorageConfig):
        self.bucket = bucket
        self.prefix = prefix
        self.cfg = cfg
        self.endpoint_url = _endpoint(cfg)
        self.region = _region(cfg)
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client_cache = None

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint_url or 'aws'!r}, region={self.region!r})"

    def __getstate__(self) -> dict:
        # A boto3 client does not pickle (and would carry credentials); rebuild it on the other side.
        return {**self.__dict__, "_client_cache": None}

    @property
    def _client(self):
        if self._client_cache is None:
            import boto3
            import botocore.config

            session = boto3.session.Session()
            # botocore's own retries smooth over a blip within seconds; longer outages are ridden
            # out by our retry window around each operation, so these stay small.
            self._client_cache = session.client(
                "s3", endpoint_url=self.endpoint_url or None, region_name=self.region,
                config=botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                              connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                              read_timeout=READ_TIMEOUT_SECONDS))
        return self._client_cache

    def _key(self, rel: str) -> str:
        return _join(self.prefix, _clean_rel(rel))

    def _error(self, err: Exception, rel: str, what: str) -> StorageError:
        code = _s3_code(err)
        url = self.url(rel)
        if code in ("NoSuchBucket",):
            return StorageError(f"{url}: bucket {self.bucket!r} does not exist ({what})")
        if code in _NOT_FOUND:
            return StorageError(f"{url} not found")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{url}: permission denied ({what}, {code})")
        return StorageError(f"{url}: {what} failed: {type(err).__name__}: {err}")

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """`fn()` with transient failures retried; what still fails becomes a StorageError naming the URI."""
        try:
            return self.retry(fn, what, rel)
        except StorageError:
            raise
        except Exception as err:  # botocore raises many unrelated classes; all become StorageError
            raise self._error(err, rel, what) from None

    def child(self, rel: str) -> "S3Store":
        return S3Store(self.bucket, self._key(rel), self.cfg)

    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)
        # The body is read inside the retried call: a connection cut mid-body is retried as a whole.
        return self._call("read", rel, lambda: self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        # Spool to memory (or disk when large) and PUT only once the producer finished cleanly; the
        # spool is kept, so a retried PUT sends the same bytes again from the start.
        key = self._key(rel)
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as buf:
            yield buf

            def put() -> None:
                buf.seek(0)
                self._client.upload_fileobj(_KeepOpen(buf), self.bucket, key)
            self._call("write", rel, put)

    def write_bytes(self, rel: str, data: bytes) -> None:
        key, body = self._key(rel), bytes(data)
        self._call("write", rel, lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=body))

    def exists(self, rel: str) -> bool:
        key = self._key(rel)

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
                return True
            except Exception as err:
                if _s3_code(err) in _NOT_FOUND:
                    return False
                raise
        return self._call("check existence", rel, head)

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)

        def list_keys() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        keys = self._call("list", prefix, list_keys)
        rels = []
        for key in keys:
            rel = key[len(self.prefix):].lstrip("/") if self.prefix else key
            # A prefix "shards" must match "shards/x", not "shards2/x".
            if prefix and not (rel == _clean_rel(prefix) or rel.startswith(_clean_rel(prefix) + "/")):
                continue
            if self.prefix and not key.startswith(self.prefix + "/"):
                continue
            rels.append(rel)
        return sorted(rels)

    def delete(self, rel: str) -> None:
        key = self._key(rel)
        self._call("delete", rel, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(rel) for rel in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self._call("delete", prefix, lambda batch=batch: self._delete_batch(batch))

    def _delete_batch(self, batch: list[dict]) -> None:
        response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        # DeleteObjects answers 200 and lists the keys it could not delete; raise them as the S3
        # error they are, so a transient one (InternalError, SlowDown) is retried like any other.
        errors = response.get("Errors", [])
        if errors:
            from botocore.exceptions import ClientError

            first = errors[0]
            raise ClientError({"Error": {"Code": first.get("Code", ""), "Message": (
                f"{len(errors)} of {len(batch)} keys not deleted, e.g. {first.get('Key')}: "
                f"{first.get('Message', '')}")}}, "DeleteObjects")

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        key = self._key(rel)
        self._call(f"upload from {local_path}", rel,
                   lambda: self._client.upload_file(str(local_path), self.bucket, key))

    def download_file(self, rel: str, local_path: str | Path) -> None:
        key = self._key(rel)
        # Each attempt fills a fresh temporary file, so a download cut short never reaches local_path.
        self._call("download", rel, lambda: _atomic_local_write(
            Path(local_path), lambda dst: self._client.download_fileobj(self.bucket, key, dst)))

    def arrow_filesystem(self, background_writes: bool = True) -> tuple[pafs.FileSystem, str]:
        """pyarrow's S3 filesystem over this store, carrying no credentials.

        No keys are passed: pyarrow's AWS SDK resolves them through its default chain (environment,
        profile, web identity / IRSA, container and instance roles) and refreshes temporary ones,
        whereas keys resolved here would expire mid-run and travel inside every pickled copy Ray
        ships to a worker. pyarrow's own retry strategy (standard, 3 attempts) is its default, which
        is also what a pickled copy rebuilds; longer outages are for `Store.retry` around the call.
        """
        import boto3

        kwargs: dict = {"region": self.region, "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                        "background_writes": background_writes}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs.update(scheme=scheme, endpoint_override=host.rstrip("/"))
        if boto3.session.Session().get_credentials() is None:
            # Nothing to sign with: read public buckets anonymously rather than fail in the SDK's chain.
            kwargs.update(anonymous=True)
        return pafs.S3FileSystem(**kwargs), _join(self.bucket, self.prefix)

    def ray_filesystem(self) -> tuple[pafs.FileSystem, str]:
        from vits_ray.arrow_retry import retrying_filesystem

        # No background writes under the retrying wrapper: Ray's syncer copies through it with
        # pyarrow's copy_files, whose tasks run on Arrow's IO thread pool; each one blocks in our
        # Python handler until its S3 upload closes, and a background upload needs a thread of that
        # same pool. Eight at once took every thread, and a sweep's driver hung for good (seen).
        filesystem, base = self.arrow_filesystem(background_writes=False)
        return retrying_filesystem(filesystem, RetryPolicy.from_config(self.cfg), self.uri), base

    def check(self) -> None:
        # A preflight (job submission) is not retried: it should say at once what is wrong.
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            code = _s3_code(err)
            where = f"{self.uri} (endpoint {self.endpoint_url or 'AWS'})"
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in ("403", "AccessDenied"):
                raise StorageError(f"{where}: no permission to access bucket {self.bucket!r}") from None
            raise StorageError(f"{where}: cannot reach bucket {self.bucket!r}: {type(err).__name__}: {err}") from None


_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


class _KeepOpen:
    """`f` except that close() does nothing: s3transfer closes what it uploads, even when the
    upload failed, and a retry must read the same spool again. The `with` block closes `f`."""

    def __init__(self, f: IO[bytes]):
        self._f = f

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def close(self) -> None:
        pass


def _s3_code(err: BaseException | None) -> str:
    """The S3 error code of `err` or of the botocore error it wraps (boto3's transfer errors do)."""
    while err is not None:
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        err = err.__cause__ or err.__context__
    return ""


__all__ = ["StorageError", "Store", "LocalStore", "S3Store", "open_store"]
