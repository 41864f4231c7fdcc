"""Where outputs go: the folder layout every command writes and `ckptavg eval` walks, built and read here.

    OUT/NAME/TAG/stepN/        one trajectory output (a model folder with ckptavg.json)
    OUT/NAME/TAG/ckptavg-run.jsonl   the run log of that run (on an object store, where nothing is
                               appended: ckptavg-run-HOST-PID.jsonl, each process's own, put whole)
    OUT/alphaA/                one interpolation
    .NAME.ckptavg-tmp-PID@HOST@...  an output being built (hidden, beside its final place)
    .NAME.ckptavg-tmp-plan@DIGEST   an output being built by several ranks, named by what it holds
    .NAME.ckptavg-lock              held (flock) by rank 0 of the ranks building NAME

Identity (which trajectory, which run) is read from each output's manifest, not from these
names, so a tree can be moved or renamed; `position_identity` reads old outputs whose manifests
predate that record.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from .manifest import MANIFEST, Manifest, RunId, read_manifest
from .storage.paths import RemotePath, location

RUN_LOG = "ckptavg-run.jsonl"
TMP_MARK = ".ckptavg-tmp-"
PLAN_MARK = "plan@"


def run_folder(out: str | Path | RemotePath, run: RunId) -> Path | RemotePath:
    return location(out) / run.model / run.tag


def output_folder(out: str | Path | RemotePath, run: RunId, step: int) -> Path | RemotePath:
    return run_folder(out, run) / f"step{step}"


def run_log(folder: Path | RemotePath) -> Path | RemotePath:
    """A process's run log in `folder`: one file every process appends to, or on a store, which cannot
    append, one object per process, put whole after each action (so that no process puts over another's)."""
    if isinstance(folder, RemotePath):
        return folder / f"{RUN_LOG.removesuffix('.jsonl')}-{socket.gethostname()}-{os.getpid()}.jsonl"
    return folder / RUN_LOG


def interpolation_folder(out: str | Path | RemotePath, alpha: float) -> Path | RemotePath:
    """(A folder or a prefix on a store: one interpolation has no run log, so it can go to either.)"""
    return location(out) / f"alpha{alpha:g}"


def temporary_name(final: Path, kind: str = "") -> Path:
    """The hidden sibling an output is built in before it is renamed into place. It names its owner by
    process and host, so that a run reaping the temporaries of dead runs (`temporary_owner`) never takes
    a live run on another host of a shared filesystem for a dead one."""
    return final.parent / f".{final.name}{TMP_MARK}{os.getpid()}@{socket.gethostname()}@{kind}{uuid.uuid4().hex[:8]}"


def ranked_temporary_name(final: Path, digest: str) -> Path:
    """The hidden sibling that the ranks of one average build it in, named by the plan (`digest`) rather than
    by a process: the same command run again finds the files a failed attempt finished."""
    return final.parent / f".{final.name}{TMP_MARK}{PLAN_MARK}{digest[:16]}"


def is_ranked_temporary(name: str, prefix: str) -> bool:
    return name.startswith(prefix + PLAN_MARK)


def lock_name(final: Path) -> Path:
    return final.parent / f".{final.name}.ckptavg-lock"


def temporary_prefix(final: Path) -> str:
    return f".{final.name}{TMP_MARK}"


def temporary_owner(name: str, prefix: str) -> tuple[int, str | None] | None:
    """(pid, host) of the run building the temporary `name` (host None for names from before hosts
    were recorded), or None when `name` is no temporary of this kind."""
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    pid, *host = rest.split("@") if "@" in rest else rest.split("-")[:1]
    if not pid.isdigit():
        return None
    return int(pid), host[0] if host else None


def position_identity(folder: Path) -> RunId:
    """OUT/NAME/TAG/stepN -> (NAME, TAG): only for outputs whose manifests do not say."""
    return RunId(folder.parent.parent.name, folder.parent.name)


def identity(folder: Path, manifest: Manifest) -> RunId:
    return manifest.run or position_identity(folder)


def finished_outputs(root: Path) -> Iterator[tuple[Path, Manifest]]:
    """Every finished output at any depth under `root`, with its manifest, in name order. Hidden folders
    (outputs still being built) are not entered, nor are outputs themselves."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST in files:
            dirs.clear()
            manifest = read_manifest(folder)
            if manifest is not None:
                yield Path(folder), manifest
