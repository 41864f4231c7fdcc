"""Nothing outside the checkpoint: every file a checkpoint's metadata names (an index's shards, a DCP
record's `relative_path`, a side file such as `config.json`) must be a file of the checkpoint's own folder.

A name is a plain file name (no folder, no `..`, nothing absolute) or, for an index, a path inside the
folder; and where it is a symbolic link, the link must resolve inside the folder too, except in the Hugging
Face cache, whose snapshot folders are links into their own repo's `blobs/`. A crafted checkpoint can then
neither read a file elsewhere (a DCP entry at `/etc/passwd`) nor have it copied into an output (a
`config.json` link to a private file).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ..errors import UnsafeCheckpointError
from ..storage.paths import RemotePath


def _allowed_roots(folder: Path) -> list[Path]:
    """Where files of `folder` may really be: the folder itself, and a Hugging Face cache snapshot's blobs."""
    root = folder.resolve()
    roots = [root]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def inside(folder: Path | RemotePath, name: object, what: str) -> Path | RemotePath:
    """`folder / name`, for a `name` that a checkpoint's metadata gives: refused (`UnsafeCheckpointError`,
    naming `what` and the name) unless it is a relative path that stays inside `folder`, also once links are
    followed."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafeCheckpointError(f"{what}: names a file {str(name)[:200]!r}, which is not a plain file name")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or any(p in ("..", ".") for p in parts) or not parts:
        raise UnsafeCheckpointError(f"{what}: names {name[:200]!r}, outside the checkpoint's folder")
    path = folder.joinpath(*parts) if isinstance(folder, Path) else _remote_join(folder, parts)
    if isinstance(path, Path):
        check_local(folder, path, what)
    return path


def _remote_join(folder: RemotePath, parts: tuple[str, ...]) -> RemotePath:
    for part in parts:
        folder = folder / part
    return folder


def check_local(folder: Path, path: Path, what: str) -> None:
    """Refuse `path` (a file of `folder`) where it is a link that leads out of `folder`."""
    real = path.resolve()
    if not any(real == r or r in real.parents for r in _allowed_roots(folder)):
        raise UnsafeCheckpointError(f"{what}: {path.name} is a link to {real}, outside the checkpoint's folder")


def check_side_files(folder: Path | RemotePath, names: Iterable[str]) -> None:
    """Refuse a checkpoint whose side files (config, tokenizer: copied into an output) lead out of it,
    before anything is written."""
    if isinstance(folder, Path):
        for name in names:
            if (folder / name).is_file():
                check_local(folder, folder / name, str(folder))
