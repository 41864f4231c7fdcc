"""Files on object stores (any fsspec URL), read by range, and written whole.

A read is cut into chunks, each a ranged GET (`cat_file(path, start=..., end=...)`, by keyword: on s3fs
the second positional argument is a version id); a chunk that fails for a passing reason (a dropped
connection, a timeout, a 5xx, throttling) is asked for again after a growing pause, from the chunk where
it stopped, so a long read never starts over. What cannot pass (no such object, access denied, no such
bucket) is one line naming the URL, and never the credentials.
"""

from __future__ import annotations

import posixpath
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError, IOFailure, OptionError
from .base import FileInfo, finish_reads

# the fsspec implementation each protocol needs, and the extra that installs it
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
CHUNK_BYTES = 4 * 1024 * 1024  # one ranged GET
IN_FLIGHT = 32  # ranged GETs at once in this process, whichever objects and stores they are for
RETRIES = 6  # pauses of 0.25, 0.5, 1, 2, 4 s: about 8 s of trying before a read is given up
FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def _passing(e: BaseException) -> bool:
    """Whether asking again may succeed: connection and timeout failures, the store's 5xx and throttling."""
    if isinstance(e, FINAL):
        return False
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    name = type(e).__name__.lower()
    return any(word in name for word in ("connection", "timeout", "throttl", "slowdown", "serviceunavailable"))


class FsspecStorage:
    """One fsspec filesystem (a bucket's, say) and the URL scheme that names it."""

    def __init__(self, fs, protocol: str) -> None:
        self.fs, self.protocol = fs, protocol

    @classmethod
    def for_url(cls, url: str, storage_options: dict | None = None) -> tuple[FsspecStorage, str]:
        protocol = url.split("://", 1)[0].lower()
        package, extra = EXTRAS.get(protocol, (None, None))
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as e:
            if package:
                raise OptionError(f"{url}: reading {protocol}:// needs {package}: pip install 'ckptavg[{extra}]'") \
                    from None
            raise OptionError(f"{url}: no fsspec filesystem for {protocol}:// ({e})") from None
        except ValueError as e:  # an unknown protocol, or options its filesystem does not take
            raise OptionError(f"{url}: no fsspec filesystem for {protocol}:// takes it ({e})") from None
        return cls(fs, protocol), path

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def _call(self, what, path: str, *args, **kwargs):
        """`what(path, ...)`, asked again after a pause while it fails for a passing reason."""
        for attempt in range(RETRIES):
            try:
                return what(path, *args, **kwargs)
            except Exception as e:  # noqa: BLE001  (each store's client raises its own kinds)
                if not _passing(e) or attempt == RETRIES - 1:
                    raise self.error(path, e) from None
                time.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")

    def error(self, path: str, e: BaseException) -> InputError | IOFailure:
        """A client's exception as one line naming the URL (never a credential): what the user can fix
        (no such object, access denied) an `InputError`, the rest an `IOFailure`."""
        if isinstance(e, FileNotFoundError):
            return InputError(f"{self.url(path)}: no such object (or bucket)")
        if isinstance(e, PermissionError):
            return InputError(f"{self.url(path)}: access denied ({type(e).__name__})")
        return IOFailure(f"{self.url(path)}: {type(e).__name__}: {_first_line(e)}")

    def info(self, path: str) -> FileInfo:
        self.fs.invalidate_cache(path)  # (fsspec keeps listings; the object's version is asked of the store)
        info = self._call(self.fs.info, path)
        if info.get("type") == "directory":
            raise InputError(f"{self.url(path)}: a prefix, not an object")
        return _file_info(info)

    def list(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache(prefix.rstrip("/"))  # (a followed run's prefix changes between listings)
        names = self._call(self.fs.ls, prefix.rstrip("/"), detail=False)
        return sorted({str(n).rstrip("/").rsplit("/", 1)[-1] for n in names})

    def find(self, prefix: str) -> dict[str, FileInfo]:
        """Every object at any depth under `prefix` (paths, as `read_into` takes them), with its size and
        version; not the folders that some stores (SeaweedFS) keep, empty, after their objects are deleted."""
        self.fs.invalidate_cache(prefix.rstrip("/"))
        found = self._call(self.fs.find, prefix.rstrip("/"), detail=True)
        return {path: _file_info(info) for path, info in sorted(found.items()) if info.get("type") != "directory"}

    def download(self, prefix: str, folder: Path, objects: dict[str, FileInfo] | None = None) -> None:
        """Every object under `prefix` (or the object itself) into `folder` (a file's path), names kept;
        `objects`, the prefix's listing when the caller has it already."""
        objects = (self.find(prefix) if objects is None else objects) or {prefix: None}
        for path in objects:
            target = Path(folder) / posixpath.relpath(path, prefix) if path != prefix else Path(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(self.fs.get_file, path, str(target))

    def write(self, path: str, data: bytes) -> None:
        """One object put whole (a single PUT: a reader sees all of it or none)."""
        self._call(self.fs.pipe_file, path, data)

    def open_write(self, path: str, part_bytes: int):
        """A file object whose bytes go up in parts of `part_bytes` (a multipart upload, where the store has
        them), that becomes an object only when closed; `discard()` abandons it."""
        return self._call(self.fs.open, path, "wb", block_size=part_bytes)

    def remove(self, paths: list[str]) -> None:
        """Delete objects (in batches, where the store takes them); ones already gone are no error."""
        if paths:
            self._call(lambda _: self.fs.rm(paths), paths[0])  # (named by the first, if it fails)

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        finish_reads(self.start_read(path, offset, buffer))

    def start_read(self, path: str, offset: int, buffer: memoryview) -> list[Future]:
        """Begin filling `buffer` with the file's bytes from `offset`, in ranged GETs of `CHUNK_BYTES` that
        run `IN_FLIGHT` at a time (fsspec's clients share one event loop, so threads asking at once are
        requests in flight at once); `finish_reads` waits for them. A GET that fails for a passing reason
        is asked again from its own start, so a long read never starts over."""
        return [_pool().submit(self._get, path, offset + done, buffer[done : done + CHUNK_BYTES])
                for done in range(0, len(buffer), CHUNK_BYTES)]

    def _get(self, path: str, start: int, into: memoryview) -> None:
        n = len(into)
        data = self._call(self.fs.cat_file, path, start=start, end=start + n)
        if len(data) != n:
            raise InputError(f"{self.url(path)}: ends before byte {start + n} (it has {start + len(data)})")
        into[:] = data


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _file_info(info: dict) -> FileInfo:
    identity = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "crc32c") if info.get(k)), None)
    return FileInfo(int(info["size"]), identity or f"{info['size']}:{info.get('LastModified', '')}")


def _pool() -> ThreadPoolExecutor:
    """The threads that make the ranged GETs, one set for the process (each input's storage shares it)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="ckptavg-get"))
        return _POOL[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
