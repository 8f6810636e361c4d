"""A small storage interface over string URIs: a local folder or an `s3://bucket/prefix`.

`pathlib` turns `s3://b/k` into `s3:/b/k`, so everything that may live on S3 is addressed by
a `Store` (rooted at a URI) plus relative keys written with `/`. Writes are atomic: a local
write goes to a temporary file beside the target and is renamed over it; an S3 PUT replaces
the object in one step. A failed write therefore leaves the previous object as it was.

S3 settings: the endpoint is `StorageConfig.endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else
`AWS_ENDPOINT_URL`, else AWS itself; credentials come from the standard AWS chain (boto3).
Credentials are never logged, printed, stored in the manifest or shown by `repr`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import pyarrow.fs as pafs

from vits_ray.config import StorageConfig


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
    return LocalStore(Path(path).expanduser().resolve())


class Store:
    """Common interface; see LocalStore and S3Store."""

    uri: str

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

    def check(self) -> None:
        raise NotImplementedError


# --- local ------------------------------------------------------------------------------

class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, rel: str) -> Path:
        return self.root / _clean_rel(rel)

    def url(self, rel: str) -> str:
        return str(self._path(rel))

    def child(self, rel: str) -> "LocalStore":
        return LocalStore(self._path(rel))

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{path} not found") from None
        except OSError as err:
            raise StorageError(f"{path}: cannot read: {err.strerror or err}") from None

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        path = self._path(rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise StorageError(f"{path}: cannot write: {err.strerror or err}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise StorageError(f"{path}: cannot write: {err.strerror or err}") from None
            raise

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [_clean_rel(prefix)]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".tmp"))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(rel).unlink()

    def delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix)
        if base.is_dir():
            shutil.rmtree(base)
        elif base.exists():
            base.unlink()

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        with open(local_path, "rb") as src, self.open_write(rel) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def download_file(self, rel: str, local_path: str | Path) -> None:
        path = self._path(rel)
        if not path.is_file():
            raise StorageError(f"{path} not found")
        _atomic_local_copy(lambda dst: _copy_path(path, dst), Path(local_path))

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{self.root}: cannot create folder: {err.strerror or err}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root}: folder is not writable")


def _copy_path(src: Path, dst: IO[bytes]) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst, 1 << 20)


def _atomic_local_copy(fill, local_path: Path) -> None:
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, local_path)
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
            self._client_cache = session.client(
                "s3", endpoint_url=self.endpoint_url or None, region_name=self.region,
                config=botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                              connect_timeout=10, read_timeout=60))
        return self._client_cache

    def _key(self, rel: str) -> str:
        return _join(self.prefix, _clean_rel(rel))

    def _error(self, err: Exception, rel: str, what: str) -> StorageError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        url = self.url(rel)
        if code in ("NoSuchBucket",):
            return StorageError(f"{url}: bucket {self.bucket!r} does not exist ({what})")
        if code in ("404", "NoSuchKey", "NotFound"):
            return StorageError(f"{url} not found")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{url}: permission denied ({what}, {code})")
        return StorageError(f"{url}: {what} failed: {type(err).__name__}: {err}")

    def child(self, rel: str) -> "S3Store":
        return S3Store(self.bucket, self._key(rel), self.cfg)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except Exception as err:  # botocore raises many unrelated classes; all become StorageError
            raise self._error(err, rel, "read") from None

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        # Spool to memory (or disk when large) and PUT only once the producer finished cleanly.
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as buf:
            yield buf
            buf.seek(0)
            try:
                self._client.upload_fileobj(buf, self.bucket, self._key(rel))
            except Exception as err:
                raise self._error(err, rel, "write") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=bytes(data))
        except Exception as err:
            raise self._error(err, rel, "write") from None

    def exists(self, rel: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except Exception as err:
            error = self._error(err, rel, "check existence")
            if str(error).endswith("not found"):
                return False
            raise error from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix)
        keys: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except Exception as err:
            raise self._error(err, prefix, "list") from None
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
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        except Exception as err:
            raise self._error(err, rel, "delete") from None

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(rel) for rel in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            try:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as err:
                raise self._error(err, prefix, "delete") from None

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        try:
            self._client.upload_file(str(local_path), self.bucket, self._key(rel))
        except Exception as err:
            raise self._error(err, rel, f"upload from {local_path}") from None

    def download_file(self, rel: str, local_path: str | Path) -> None:
        def fill(dst: IO[bytes]) -> None:
            try:
                self._client.download_fileobj(self.bucket, self._key(rel), dst)
            except Exception as err:
                raise self._error(err, rel, "download") from None
        _atomic_local_copy(fill, Path(local_path))

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        import boto3

        kwargs: dict = {"region": self.region}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs.update(scheme=scheme, endpoint_override=host.rstrip("/"))
        creds = boto3.session.Session().get_credentials()
        if creds is not None:
            # Resolve the boto3 chain once so pyarrow sees exactly the credentials boto3 uses.
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                          session_token=frozen.token)
        else:
            kwargs.update(anonymous=True)
        return pafs.S3FileSystem(**kwargs), _join(self.bucket, self.prefix)

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
            where = f"{self.uri} (endpoint {self.endpoint_url or 'AWS'})"
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in ("403", "AccessDenied"):
                raise StorageError(f"{where}: no permission to access bucket {self.bucket!r}") from None
            raise StorageError(f"{where}: cannot reach bucket {self.bucket!r}: {type(err).__name__}: {err}") from None


__all__ = ["StorageError", "Store", "LocalStore", "S3Store", "open_store"]
