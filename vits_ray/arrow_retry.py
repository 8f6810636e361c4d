"""A pyarrow filesystem whose every call rides out storage outages, for Ray Train's own writes.

Our checkpoints and records go through `Store`, which retries. Ray Train's controller also writes
to the run's storage by itself (its checkpoint-manager snapshot after every registered checkpoint,
a marker at start) through the pyarrow filesystem given to `RunConfig`; a write that meets an
outage fails the controller, and a controller error is never retried: the run ends. pyarrow's
own retry strategy gives up within seconds (and is lost when the filesystem is pickled).
`retrying_filesystem` wraps the filesystem so those calls get the same window as ours.

Writes are buffered and uploaded whole when the stream closes, so a retried upload starts from
the first byte; reads are read whole, for the same reason. Ray's files through it are small.
"""

from __future__ import annotations

import io
from typing import Callable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from vits_ray.retry import RetryPolicy, with_retries

T = TypeVar("T")


def retrying_filesystem(inner: pafs.FileSystem, policy: RetryPolicy, name: str) -> pafs.FileSystem:
    """`inner` with every call retried under `policy`; `name` (a URI) names it in messages."""
    return pafs.PyFileSystem(RetryingHandler(inner, policy, name))


class _UploadOnClose(io.BytesIO):
    """An output stream that uploads its bytes, retried, when closed."""

    def __init__(self, upload: Callable[[bytes], None]):
        super().__init__()
        self._upload = upload

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._upload(data)


class RetryingHandler(pafs.FileSystemHandler):
    def __init__(self, inner: pafs.FileSystem, policy: RetryPolicy, name: str):
        self.inner, self.policy, self.name = inner, policy, name

    def __eq__(self, other) -> bool:
        return (isinstance(other, RetryingHandler) and self.inner.equals(other.inner)
                and self.policy == other.policy)

    def __ne__(self, other) -> bool:
        return not self == other

    def _retry(self, what: str, path: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, what=what, url=f"{self.name} ({path})", policy=self.policy)

    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry("stat", ",".join(paths)[:200], lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry("list", selector.base_dir, lambda: self.inner.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retry("create folder", path, lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retry("delete folder", path, lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry("delete folder contents", path,
                    lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._retry("delete everything", "/", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._retry("delete", path, lambda: self.inner.delete_file(path))

    def move(self, src, dest):
        self._retry("move", f"{src} -> {dest}", lambda: self.inner.move(src, dest))

    def copy_file(self, src, dest):
        self._retry("copy", f"{src} -> {dest}", lambda: self.inner.copy_file(src, dest))

    def _read_all(self, path) -> pa.BufferReader:
        def read() -> bytes:
            with self.inner.open_input_stream(path) as stream:
                return stream.read()
        return pa.BufferReader(self._retry("read", path, read))

    def open_input_stream(self, path):
        return self._read_all(path)

    def open_input_file(self, path):
        return self._read_all(path)

    def open_output_stream(self, path, metadata):
        def upload(data: bytes) -> None:
            def write() -> None:
                with self.inner.open_output_stream(path, metadata=metadata) as stream:
                    stream.write(data)
            self._retry("write", path, write)
        return pa.PythonFile(_UploadOnClose(upload), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError(f"{self.name}: appending is not supported by object stores")
