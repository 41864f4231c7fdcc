"""Files on object stores (any fsspec URL), read by range.

A read is cut into chunks, each a ranged GET (`cat_file(path, start=..., end=...)`, by keyword: on s3fs
the second positional argument is a version id); a chunk that fails for a passing reason (a dropped
connection, a timeout, a 5xx, throttling) is asked for again after a growing pause, from the chunk where
it stopped, so a long read never starts over. What cannot pass (no such object, access denied, no such
bucket) is one line naming the URL, and never the credentials.
"""

from __future__ import annotations

import time

from ..errors import InputError, IOFailure, OptionError
from .base import FileInfo

# the fsspec implementation each protocol needs, and the extra that installs it
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
CHUNK_BYTES = 16 * 1024 * 1024
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
                if isinstance(e, FileNotFoundError):
                    raise InputError(f"{self.url(path)}: no such object (or bucket)") from None
                if isinstance(e, PermissionError):
                    raise InputError(f"{self.url(path)}: access denied ({type(e).__name__})") from None
                if not _passing(e) or attempt == RETRIES - 1:
                    raise IOFailure(f"{self.url(path)}: {type(e).__name__}: {_first_line(e)}") from None
                time.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")

    def info(self, path: str) -> FileInfo:
        self.fs.invalidate_cache(path)  # (fsspec keeps listings; the object's version is asked of the store)
        info = self._call(self.fs.info, path)
        if info.get("type") == "directory":
            raise InputError(f"{self.url(path)}: a prefix, not an object")
        identity = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "crc32c") if info.get(k)), None)
        return FileInfo(int(info["size"]), identity or f"{info['size']}:{info.get('LastModified', '')}")

    def list(self, prefix: str) -> list[str]:
        names = self._call(self.fs.ls, prefix.rstrip("/"), detail=False)
        return sorted({str(n).rstrip("/").rsplit("/", 1)[-1] for n in names})

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            n = min(CHUNK_BYTES, len(buffer) - done)
            start = offset + done
            data = self._call(self.fs.cat_file, path, start=start, end=start + n)
            if len(data) != n:
                raise InputError(f"{self.url(path)}: ends before byte {start + n} (it has {start + len(data)})")
            buffer[done : done + n] = data
            done += n


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
