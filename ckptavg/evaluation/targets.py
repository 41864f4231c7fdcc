"""Which checkpoints `ckptavg eval` scores: the finished outputs at any depth under a folder, and the
original checkpoint at each of their steps.

The original is the newest input of its window, found from the output's manifest: a local folder,
or a Hub revision that is fetched for scoring and deleted again afterwards (when ckptavg
downloaded it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InputError
from ..layout import finished_outputs, identity
from ..manifest import MANIFEST, InputRecord
from ..report.store import ORIGINAL


@dataclass(frozen=True)
class Target:
    """One checkpoint to score."""

    model: str
    tag: str
    method: str
    k: int | None
    nu: int | None
    step: int
    folder: Path  # where it is, or will be once fetched
    repo: str | None = None  # Hub repo to fetch it from when `folder` is missing
    revision: str | None = None
    pattern: str | None = None
    cache_dir: Path | None = None  # the Hugging Face cache the run downloaded it into
    fetch_bytes: int = 0


def find_targets(root: Path, steps: set[int] | None = None, originals: bool = True) -> list[Target]:
    """Trajectory outputs at any depth under `root` and (with `originals`) the original checkpoint
    of each of their steps."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    targets: dict[tuple[str, str, int], Target] = {}
    for folder, manifest in finished_outputs(root):
        method = manifest.method
        if method.step is None:
            continue  # `ckptavg average` and `interpolate` outputs: no place on a trajectory
        if steps is not None and method.step not in steps:
            continue
        _check_scorable(folder, manifest.output.format,
                        manifest.newest.trainer if manifest.output.format != "safetensors" else None)
        run = identity(folder, manifest)
        targets[(run.model, run.tag, method.step)] = Target(run.model, run.tag, method.name, method.k, method.nu,
                                                            method.step, folder)
        if originals and (run.model, ORIGINAL, method.step) not in targets:
            targets[(run.model, ORIGINAL, method.step)] = _original(run.model, method.step, manifest.inputs)
    if not targets and steps is None:
        raise InputError(f"{root}: no finished trajectory outputs (stepN/{MANIFEST}) at any depth")
    if steps is not None:
        missing = sorted(steps - {t.step for t in targets.values()})
        if missing:
            raise InputError(f"{root}: no finished output for step(s) {', '.join(map(str, missing))}")
    return sorted(targets.values(), key=lambda t: (t.model, t.step, t.tag != ORIGINAL, t.tag))


def _check_scorable(folder: Path, fmt: str, trainer: str | None = None, original: bool = False) -> None:
    """lm-eval scores Hugging Face model folders: anything else is refused before anything is scored,
    saying how to make one."""
    if fmt in ("safetensors", "bin") and trainer in (None, "transformers"):
        return
    what = f"a checkpoint in {trainer}'s layout" if trainer and trainer != "dcp" else f"a {fmt} checkpoint"
    how = " (OLMo-core converts its own with olmo_core.nn.hf.convert_checkpoint_to_hf)" if trainer == "olmo-core" \
        else ""
    if original:
        raise InputError(f"{folder}: the original checkpoint is {what}, not a Hugging Face model folder, which is "
                         f"what lm-eval scores: convert it with the trainer's own tools{how}, or pass "
                         f"--no-originals")
    raise InputError(f"{folder}: {what}, not a Hugging Face model folder, which is what lm-eval scores: average "
                     f"with --output-format safetensors into a folder with the model's config.json, or convert it "
                     f"with the trainer's own tools{how}")


def _original(model: str, step: int, inputs: Sequence[InputRecord]) -> Target:
    newest = next((i for i in inputs if i.step == step), inputs[-1])
    _check_scorable(Path(newest.path), newest.format, newest.trainer, original=True)
    folder = Path(newest.path)
    target = Target(model, ORIGINAL, ORIGINAL, None, None, step, folder)
    if newest.repo and not _complete(folder, newest):
        target = replace(target, repo=newest.repo, revision=newest.revision, pattern=newest.pattern,
                         cache_dir=Path(newest.cache_dir) if newest.cache_dir else _legacy_cache_dir(folder),
                         fetch_bytes=sum(f.size for f in newest.files))
    return target


def _legacy_cache_dir(snapshot: Path) -> Path | None:
    """Manifests older than the `cache_dir` record: CACHE/models--ORG--NAME/snapshots/COMMIT."""
    return snapshot.parents[2] if snapshot.parent.name == "snapshots" else None


def _complete(folder: Path, described: InputRecord) -> bool:
    return all((folder / f.name).is_file() for f in described.files) and (folder / "config.json").is_file()


def fetch_bytes(targets: Sequence[Target]) -> int:
    return sum(t.fetch_bytes for t in targets if t.repo)


@contextmanager
def fetched(target: Target, sources: dict, bars) -> Iterator[Path]:
    """Put a Hub original on disk for scoring and take it away again. `sources` keeps one listed
    HubTrajectory per repo, so a study lists each repo's branches once, not once per original."""
    from ..checkpoints.layouts import DEFAULT_STEP_PATTERN
    from ..trajectory.hub import HubTrajectory

    key = (target.repo, target.pattern, target.cache_dir)
    if key not in sources:
        sources[key] = HubTrajectory(target.repo, target.pattern or DEFAULT_STEP_PATTERN, cache_dir=target.cache_dir,
                                     bars=bars)
    source = sources[key]
    steps = {b: s for s, b in source.branches.items()}
    if target.revision not in steps:
        raise InputError(f"{target.repo}: revision {target.revision} is gone")
    try:
        yield source.fetch(steps[target.revision])
    finally:
        source.evict(steps[target.revision])
