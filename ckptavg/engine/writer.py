"""Streaming output files and atomic output folders.

What a format puts around the tensors (a safetensors header, DCP's record framing) depends only on
names, dtypes and shapes, all known from the plan (`Shard.frames`), so each frame is written as its
place comes and each tensor's bytes follow as soon as they are computed: the writer never holds more
than the piece it is given. The whole output is built in a
hidden temporary folder beside the destination and renamed into place after every file
is fsynced and the manifest, written last, is in: a folder named like the destination
is always complete.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..checkpoints.confine import check_local
from ..checkpoints.names import SIDE_FILES
from ..errors import DiskSpaceError, IOFailure, OutputExistsError, describe_os_error, with_path
from ..layout import is_ranked_temporary, lock_name, temporary_name, temporary_owner, temporary_prefix
from ..manifest import MANIFEST, Manifest, manifest_json
from .plan import Shard
from .tensors import whole_blocks

SPACE_MARGIN = 64 * 1024 * 1024
STAGE_BYTES = 16 * 1024 * 1024  # per output file being written


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardFile:
    """One output file, written front to back exactly once: its frames, and between them the bytes of
    its tensors, in order, given to `write` in pieces.

    Written with direct I/O (O_DIRECT) where the filesystem takes it: through the page cache, writing
    costs system CPU for the copy and then waits on dirty-page throttling, where direct writes leave
    fsync next to nothing to do (measured: docs/how-it-works.md). Direct
    I/O wants aligned memory, offsets and lengths, so bytes are gathered in a page-aligned staging
    buffer and go out in whole blocks; the last block is padded and the file then cut to its length.
    Where O_DIRECT is refused (tmpfs before Linux 6.6, some network filesystems), the same writes go
    through the page cache. A direct write leaves nothing in the page cache, so the inputs the next
    window shares stay there, and whatever loads the output next (a scorer) reads it from disk.
    """

    def __init__(self, path: Path, shard: Shard, *, direct: bool = True, stage_bytes: int = STAGE_BYTES) -> None:
        self.path = path
        self.expected = shard.nbytes
        self.written = 0  # bytes taken, staged or on disk
        # (frame, tensor bytes that follow it), in order; each frame goes out when the bytes before it are in
        frames = shard.frames or (b"",) * (len(shard.jobs) + 1)
        self._frames = list(zip(frames, [j.nbytes for j in shard.jobs] + [0], strict=True))
        self._left = 0  # bytes of the current tensor still to come
        self._stage = mmap.mmap(-1, whole_blocks(stage_bytes))  # page-aligned
        self._staged = np.frombuffer(self._stage, dtype=np.uint8)
        self._fill = 0
        try:
            self._open(direct)
        except BaseException:
            self._stage.close()
            raise
        self._next_frames()

    def _open(self, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # (a trainer's DCP folder inside the output)
            try:
                self._fd = os.open(self.path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
            except OSError as e:
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                self.direct = False  # the filesystem does not do direct I/O
                self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise with_path(e, self.path) from None

    def _next_frames(self) -> None:
        """Stage the frames due: every one whose tensor bytes before it are all in."""
        while self._left == 0 and self._frames:
            frame, self._left = self._frames.pop(0)
            self._stage_bytes(np.frombuffer(frame, np.uint8))

    def write(self, data: memoryview | bytes | np.ndarray) -> None:
        """The next bytes of the tensors (never more than the current tensor has left)."""
        src = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        if src.size > self._left:
            raise RuntimeError(f"{self.path}: {src.size} bytes given where the tensor has {self._left} left")
        self._left -= src.size
        self._stage_bytes(src)
        self._next_frames()

    def _stage_bytes(self, src: np.ndarray) -> None:
        while src.size:
            n = min(src.size, self._staged.size - self._fill)
            np.copyto(self._staged[self._fill : self._fill + n], src[:n])  # releases the GIL, unlike a memoryview copy
            self._fill += n
            self.written += n
            src = src[n:]
            if self._fill == self._staged.size:
                self._flush(self._fill)

    def _flush(self, nbytes: int) -> None:
        """Write the first `nbytes` of the staging buffer (a whole number of blocks when direct)."""
        view = memoryview(self._stage)[:nbytes]
        try:
            while view:
                try:
                    n = os.write(self._fd, view)
                except OSError as e:
                    if not self.direct or e.errno != errno.EINVAL:
                        raise
                    # a filesystem that opened with O_DIRECT but wants another alignment: go through the cache
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    self.direct = False
                    continue
                view = view[n:]
        except OSError as e:  # a write on a descriptor names no file: say which
            raise with_path(e, self.path) from None
        finally:
            view.release()
        self._fill = 0

    def finish(self) -> None:
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}")
        self._complete()
        self.abort()

    def _complete(self) -> None:
        """Write out what is staged and make the file durable."""
        try:
            if self._fill:
                tail = self._fill
                if self.direct:  # whole blocks only: pad with zeros, then cut the file back to its length
                    padded = whole_blocks(tail)
                    self._staged[tail:padded] = 0
                    self._flush(padded)
                    os.ftruncate(self._fd, self.expected)
                else:
                    self._flush(tail)
            os.fsync(self._fd)
        except OSError as e:
            raise with_path(e, self.path) from None

    def abort(self) -> None:
        """Close the file (a finished one, or one an error left behind: its folder is deleted)."""
        self._close()
        self._staged = None  # the staging buffer's last view, before it can be unmapped
        self._stage.close()


    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_extra_files(folder: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """The plan's small files (an index, DCP's `.metadata`), each written whole and durably (into the
    output's temporary folder, which appears only once everything in it is)."""
    for name, data in files:
        if not isinstance(folder, Path):  # a store's: one PUT each, which is whole or absent
            (folder / name).write_bytes(data)
            continue
        try:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            with open(folder / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise with_path(e, folder / name) from None


def copy_side_files(src, dst, names: Iterable[str] = SIDE_FILES) -> list[str]:
    """The files of `names` that `src` (a local folder, or one on a store) has, copied into `dst`."""
    copied = []
    for name in names:
        if (src / name).is_file():
            if isinstance(src, Path):  # a link out of the checkpoint's folder is refused, not followed
                check_local(src, src / name, str(src))
            dst.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path) and isinstance(dst, Path):
                shutil.copyfile(src / name, dst / name)
            else:
                (dst / name).write_bytes((src / name).read_bytes())
            copied.append(name)
    return copied


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise DiskSpaceError(
            f"{folder}: {needed / 1e9:.2f} GB needed for the output, only {free / 1e9:.2f} GB free"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_lock(final: Path) -> int | None:
    """A descriptor holding the lock of the output `final` (`layout.lock_name`), or None while another process,
    here or on another host of the shared filesystem, holds it. The lock file is removed by its holder on its
    way out; a lock taken on a file so removed is let go and the new file's taken."""
    path = lock_name(final)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


def unlock(final: Path, fd: int) -> None:
    lock_name(final).unlink(missing_ok=True)
    os.close(fd)


def remove_stale_temporaries(final: Path, *, locked: bool = False, keep: Path | None = None) -> None:
    """Delete temporary folders that killed runs on this host left beside `final`; another host's are
    left alone (its processes cannot be asked after from here). The folder of an average on ranks (named by
    its plan, not a process) is stale when no rank 0 holds the output's lock (`locked`: this process does);
    `keep` is the one this run goes on with."""
    prefix = temporary_prefix(final)
    if not final.parent.is_dir():
        return
    here = socket.gethostname()
    held = None
    try:
        for entry in final.parent.iterdir():
            if not entry.name.startswith(prefix) or entry == keep:
                continue
            if is_ranked_temporary(entry.name, prefix):
                if not locked and held is None and (held := try_lock(final)) is None:
                    continue  # a launch on ranks is building it now
                shutil.rmtree(entry, ignore_errors=True)
                continue
            owner = temporary_owner(entry.name, prefix)  # None: a name no run of ours made, so no run owns it
            if owner is None or owner[1] in (here, None) and not pid_alive(owner[0]):
                shutil.rmtree(entry, ignore_errors=True)
    finally:
        if held is not None:
            unlock(final, held)


def commit_folder(path: Path, final: Path, manifest: Manifest, fsync_files: Iterable[Path] = (), *,
                  force: bool = False) -> None:
    """Make the temporary folder `path` the output `final`: its files durable, the manifest last, one rename."""
    for f in fsync_files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    write_text(path / MANIFEST, manifest_json(manifest), fsync=True)  # last: it marks the output finished
    fsync_dir(path)
    old = None
    if final.exists():
        if not force:
            raise OutputExistsError(f"{final} appeared while writing (pass --force to replace it)")
        old = temporary_name(final, "old-")
        os.rename(final, old)
    os.rename(path, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class OutputDir:
    """Build a folder under a temporary name; `commit` makes it appear whole, or not at all.

    Leaving the `with` block without `commit` (an error, Ctrl-C) deletes the temporary folder.
    """

    def __init__(self, final: str | os.PathLike, force: bool = False) -> None:
        self.final = Path(final).absolute()
        self.force = force
        self.path = temporary_name(self.final)
        self._committed = False

    def check(self) -> None:
        if self.final.exists() and not self.force:
            raise OutputExistsError(f"{self.final} exists (pass --force to replace it)")

    def __enter__(self) -> OutputDir:
        self.check()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.final)
        self.path.mkdir()
        return self

    def check_space(self, nbytes: int) -> None:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(self.final.parent, nbytes)

    def commit(self, manifest: Manifest, fsync_files: Iterable[Path] = ()) -> Path:
        commit_folder(self.path, self.final, manifest, fsync_files, force=self.force)
        self._committed = True
        return self.final

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(error, OSError):
            # the operating system failed mid-run (a full disk, an I/O error, an input gone): one line,
            # naming an output file as the user will look for it, not by its temporary folder
            if error.filename is not None and Path(error.filename).is_relative_to(self.path):
                renamed = self.final / Path(error.filename).relative_to(self.path)
                error = OSError(error.errno, error.strerror, str(renamed))
            raise IOFailure(f"{describe_os_error(error)}; nothing was left at {self.final}") from None
