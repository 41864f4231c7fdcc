"""Single outputs: the interpolations between two checkpoints, and what a finished output's manifest says."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .. import options as opt
from ..engine.ranks import TIMEOUT_S, Ranks, joined
from ..errors import OptionError
from ..manifest import Method, is_finished, read_manifest
from ..storage.paths import RemotePath
from .settings import resolve_device, torch_dtype


def interpolate(a: str | Path, b: str | Path, alphas: Sequence[float], out: str | Path, *, device: str = "auto",
                dtype: str = "auto", copy: Sequence[str] = (), force: bool = False, output_format: str = "auto",
                progress: Callable[[float], Callable | None] | None = None, ranks: Ranks | None = None,
                timeout: float = TIMEOUT_S) -> list[tuple[float, Path | RemotePath, bool]]:
    """alpha*A + (1-alpha)*B for each alpha into OUT/alphaA/; finished ones are skipped unless `force`.
    Returns (alpha, folder, written) per alpha. `progress(alpha)` gives `average_checkpoints`' hook. `ranks`
    (launched by torchrun or srun): every alpha shared by them, one after another (`average_checkpoints`)."""
    from ..engine.average import average_checkpoints
    from ..layout import interpolation_folder

    if not alphas:
        raise OptionError("--alphas is empty")
    out_dtype = torch_dtype(opt.choice(dtype, opt.AVERAGE_DTYPES, "--dtype"))
    patterns, dev = opt.copy_patterns(copy), resolve_device(device)
    output_format = opt.choice(output_format, opt.OUTPUT_FORMATS, "--output-format")
    done = []
    with joined(ranks, timeout) as group:
        for alpha in alphas:
            target = interpolation_folder(out, alpha)
            finished = not force and is_finished(target)
            if group is not None:  # (rank 0 decides: every rank then makes the same averages)
                finished = group.from_first(finished)
            if finished:
                done.append((alpha, target, False))
                continue
            average_checkpoints([a, b], target, weights=[alpha, 1 - alpha], normalize=False, force=force,
                                device=dev, out_dtype=out_dtype, copy=patterns, output_format=output_format,
                                progress=progress(alpha) if progress else None, ranks=group, timeout=timeout,
                                method=Method("interpolate", params={"alpha": alpha, "a": str(a), "b": str(b)}))
            done.append((alpha, target, True))
    return done


def output_summary(folder: str | Path) -> tuple[int, float]:
    """(tensor bytes, seconds) of a finished output, from its manifest."""
    manifest = read_manifest(folder)
    return (manifest.output.tensor_bytes, manifest.seconds) if manifest else (0, 0.0)
