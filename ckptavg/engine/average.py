"""Averaging as a library call: open the inputs, plan, execute, and record what was done.

`average_checkpoints` writes a Hugging Face model folder atomically with its manifest last;
`average_in_memory` gives the same tensors without writing, and `plan_in_memory` + `average_into`
write them straight into existing tensors (a resident model's parameters, for scoring an average).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__, hash_ahead
from ..checkpoints.confine import check_side_files
from ..checkpoints.formats import AUTO, OUTPUTS, resolve_format
from ..checkpoints.index import Checkpoint
from ..checkpoints.open import open_checkpoint
from ..errors import InputError
from ..hashing import file_sha256, known_sha256
from ..manifest import (
    DtypePolicy,
    FileRecord,
    InputRecord,
    Manifest,
    Method,
    OutputRecord,
    Provenance,
    RunId,
    ShardRecord,
)
from ..storage.base import FileInfo
from ..storage.paths import RemotePath
from .pipeline import PIECE_ELEMENTS, Progress, execute_in_memory, execute_into, execute_plan, resolve_device
from .plan import DEFAULT_COPY_PATTERNS, AveragePlan, check_weights, plan_average, uniform_weights
from .ranks import TIMEOUT_S, Group, Ranks
from .upload import open_output
from .writer import copy_side_files

Inputs = Sequence[str | os.PathLike | Checkpoint]


def _open_and_plan(inputs: Inputs, weights: Sequence[float] | None, normalize: bool, copy: Sequence[str],
                   output_format: str = "safetensors", **plan_options) -> tuple[list[Checkpoint], AveragePlan]:
    checkpoints = [c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in inputs]
    weights = check_weights(weights or uniform_weights(len(checkpoints)), len(checkpoints), normalize)
    patterns = tuple(dict.fromkeys((*DEFAULT_COPY_PATTERNS, *copy)))
    newest = checkpoints[-1]
    output = OUTPUTS[resolve_format(output_format, [c.format for c in checkpoints], newest.trainer)]
    for folder, names, _ in output.side_files(newest):  # (a link out of the checkpoint: refused before any write)
        check_side_files(folder, names)
    return checkpoints, plan_average(checkpoints, weights, copy_patterns=patterns, output_format=output.output,
                                     source=output.source(newest), **plan_options)


def average_in_memory(inputs: Inputs, *, weights: Sequence[float] | None = None, normalize: bool = True,
                      out_dtype: torch.dtype | None = None, accumulate: torch.dtype | None = None,
                      device: str | torch.device = "auto", copy: Sequence[str] = (),
                      piece_elements: int = PIECE_ELEMENTS, reread: Collection[int] = ()) -> dict[str, torch.Tensor]:
    """The same average as `average_checkpoints`, as a CPU state dict (names as stored), written nowhere.

    Holds the whole output in memory, which scoring the model needs anyway; the inputs are
    still streamed. `reread`: as for `average_checkpoints`."""
    _, plan = _open_and_plan(inputs, weights, normalize, copy, out_dtype=out_dtype, accumulate=accumulate,
                             reread=reread)
    return execute_in_memory(plan, resolve_device(device), piece_elements)


def plan_in_memory(inputs: Inputs, *, weights: Sequence[float] | None = None, normalize: bool = True,
                   out_dtype: torch.dtype | None = None, accumulate: torch.dtype | None = None,
                   copy: Sequence[str] = (), reread: Collection[int] = ()) -> AveragePlan:
    """The plan of the same average as `average_checkpoints`, for `average_into`: the caller learns the
    output's tensor names (and can check them) before a byte of tensor data is read. `reread`: as for
    `average_checkpoints`."""
    return _open_and_plan(inputs, weights, normalize, copy, out_dtype=out_dtype, accumulate=accumulate,
                          reread=reread)[1]


def average_into(plan: AveragePlan, destinations: dict[str, torch.Tensor], *, device: str | torch.device = "auto",
                 piece_elements: int = PIECE_ELEMENTS) -> None:
    """Execute `plan` into existing tensors (by stored name), each value rounded to the plan's output
    dtype first, so that they hold exactly what loading the written average would give them."""
    execute_into(plan, destinations, resolve_device(device), piece_elements)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "auto (as stored in the newest input)" if dtype is None else str(dtype).removeprefix("torch.")


def _accumulation_name(plan: AveragePlan) -> str:
    """The dtype the averaged tensors were summed in ("float32", "float64"), or each one's, by input dtype."""
    used: dict[str, set[str]] = {}
    for job in plan.jobs:
        if job.action == "average":
            used.setdefault(str(job.accumulate).removeprefix("torch."), set()).update(
                str(r.dtype).removeprefix("torch.") for r in job.sources)
    if len(used) <= 1:
        return next(iter(used), "float32")
    return ", ".join(f"{acc} for {'/'.join(sorted(ins))} inputs" for acc, ins in sorted(used.items()))


def _versions() -> dict[str, str]:
    import safetensors

    return {"ckptavg": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _describe_inputs(checkpoints: Sequence[Checkpoint], hashes: dict[Path, tuple[str, str]] | None,
                     provenance: Sequence[Provenance] | None, plan: AveragePlan,
                     remote: dict[RemotePath, FileInfo]) -> tuple[InputRecord, ...]:
    """`remote`: each object's size and ETag as the average found them (asked of the store once)."""
    inputs = []
    for i, c in enumerate(checkpoints):
        files = tuple(FileRecord(f.name, remote[f].size if f in remote else f.stat().st_size,
                                 *(hashes[f] if hashes is not None else (None, None)),
                                 etag=remote[f].identity if f in remote else None) for f in c.files)
        inputs.append(InputRecord(str(c.path.absolute()), c.format, files, plan.absent[i] if plan.absent else (),
                                  **(asdict(provenance[i]) if provenance else {}), trainer=c.trainer))
    return tuple(inputs)


def average_checkpoints(
    inputs: Inputs,
    out: str | os.PathLike | RemotePath,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
    accumulate: torch.dtype | None = None,
    device: str | torch.device = "auto",
    shard_bytes: int = 5 * 10**9,
    output_format: str = AUTO,
    force: bool = False,
    hash_inputs: bool = True,
    copy: Sequence[str] = (),
    method: Method | None = None,
    provenance: Sequence[Provenance] | None = None,
    run: RunId | None = None,
    piece_elements: int = PIECE_ELEMENTS,
    progress: Callable[[AveragePlan], Progress | None] | None = None,
    reread: Collection[int] = (),
    ranks: Ranks | Group | None = None,
    timeout: float = TIMEOUT_S,
) -> Path | RemotePath:
    """Average checkpoints (oldest first, newest last) into the folder `out`: a Hugging Face model folder
    of safetensors; or (`output_format` "dcp", the default for DCP inputs) a DCP checkpoint of the model
    tensors under the names they were saved with, which `torch.distributed.checkpoint.load` and the
    trainers' loaders read; or ("torch", the default for Lightning, nanoGPT and DeepSpeed inputs) the
    trainer's own `torch.save` file, without optimizer state (`checkpoints/outputs.py`).

    Config and tokenizer files, and every tensor that is not averaged, come from the newest
    input. Tensors that are never averaged (non-float tensors, Pythia's non-trained buffers and
    names matching a `copy` pattern) may be absent from some inputs; the manifest says which.
    `method`, `provenance` (per input: where it came from, `InputRecord`'s trajectory fields)
    and `run` (the trajectory run the output belongs to) go into the manifest. `reread` (positions in
    `inputs`) names the checkpoints that a later average will read again: where they fit in half the
    memory available they are read through the page cache, for that average to find them there, while
    the others are read past it. `out` may be a URL (`s3://bucket/avg`): the files are put there as they
    are computed, the manifest last (`upload.py`). `ranks` (`ranks.from_environment()`: launched by
    torchrun or srun; or the `ranks.Group` they joined, for a command of several averages): this process is
    one of several that share the average (`on_ranks.py`), and gives up `timeout` seconds after another falls
    silent. Returns the output folder.
    """
    if ranks is not None:
        from .on_ranks import average_on_ranks

        return average_on_ranks(ranks, inputs, out, timeout=timeout, weights=weights, normalize=normalize,
                                out_dtype=out_dtype, accumulate=accumulate, device=device, shard_bytes=shard_bytes,
                                output_format=output_format, force=force, hash_inputs=hash_inputs, copy=copy,
                                method=method, provenance=provenance, run=run, piece_elements=piece_elements,
                                progress=progress)
    output = open_output(out, force=force)
    output.check()
    dev = resolve_device(device)
    checkpoints, plan = _open_and_plan(inputs, weights, normalize, copy, out_dtype=out_dtype,
                                       accumulate=accumulate, shard_bytes=shard_bytes, reread=reread,
                                       output_format=output_format)
    output.check_space(plan.output_bytes)
    started = time.time()
    with output, ThreadPoolExecutor(1, thread_name_prefix="ckptavg-hash") as pool:
        files = sorted({f for c in checkpoints for f in c.files}, key=str) if hash_inputs else []
        # what the command line's child hashed while torch was imported (and the file it is finishing)
        ahead = hash_ahead.claim(files)
        hashes = {f: (digest, "computed") for f, digest in ahead.done.items()}
        hashes.update((f, known) for f in files if f not in hashes and (known := known_sha256(f)) is not None)
        # files whose every tensor has a byte offset are hashed from the bytes the engine reads; the
        # others (tensors copied out of torch's mapping of a `.bin`) in a pass of their own alongside it
        mapped = {r.file for c in checkpoints for r in c.tensors.values() if r.offset is None}
        streamed = {f for c in checkpoints for f in c.files if f not in mapped}
        unknown = [f for f in files if f not in hashes and f != ahead.pending]
        in_pass = [f for f in unknown if f in streamed]
        apart = {f: pool.submit(file_sha256, f) for f in unknown if f not in streamed}
        # an object on a store may be overwritten while it is read: its version before and after must agree
        remote = {f: f.info() for c in checkpoints for f in c.files if isinstance(f, RemotePath)}
        hashers = execute_plan(plan, output.path, device=dev, piece_elements=piece_elements,
                               progress=progress(plan) if progress else None, hash_files=in_pass)
        changed = [f for f, before in remote.items() if f.info().identity != before.identity]
        if changed:
            raise InputError(f"{changed[0]} changed while it was being read (its ETag differs): nothing was "
                             f"written; run again once the run has finished writing it")
        side = _copy_side_files(plan, checkpoints[-1], output.path)
        for f, hasher in hashers.items():
            hasher.remember()
            hashes[f] = (hasher.hexdigest(), "computed")
        hashes.update((f, fut.result()) for f, fut in apart.items())
        hashes.update((f, (digest, "computed")) for f, digest in ahead.finish().items())
        manifest = _manifest(plan, checkpoints, hashes if hash_inputs else None, remote, side, str(dev),
                             time.time() - started, normalize=normalize, out_dtype=out_dtype, method=method,
                             provenance=provenance, run=run)
        output.commit(manifest, fsync_files=[output.path / n for n in side])
    return output.final


def _copy_side_files(plan: AveragePlan, newest: Checkpoint, folder: Path) -> list[str]:
    """What a loader needs beside the tensors, from the newest input, as its format says; their names."""
    side = []
    for src, names, inside in OUTPUTS[plan.format].side_files(newest):
        side += [str(Path(inside) / n) for n in copy_side_files(src, folder / inside, names)]
    return side


def _manifest(plan: AveragePlan, checkpoints: Sequence[Checkpoint], hashes: dict | None,
              remote: dict[RemotePath, FileInfo], side: Sequence[str], device: str, seconds: float, *,
              normalize: bool, out_dtype: torch.dtype | None, method: Method | None,
              provenance: Sequence[Provenance] | None, run: RunId | None, ranks: int = 1) -> Manifest:
    return Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        method=method or Method("weighted_average"),
        weights=plan.weights,
        normalized=normalize,
        inputs=_describe_inputs(checkpoints, hashes, provenance, plan, remote),
        dtype_policy=DtypePolicy(
            output=_dtype_name(out_dtype), accumulate=_accumulation_name(plan),
            not_averaged="copied from the newest input: non-float tensors and non-trained buffers; "
                         "the output holds one exactly when the newest input does",
            copy_patterns=plan.copy_patterns),
        copied_tensors=plan.copied,
        output=OutputRecord(tuple(ShardRecord(s.filename, len(s.jobs), s.nbytes) for s in plan.shards),
                            plan.output_bytes, tuple(side), plan.format),
        device=device,
        seconds=round(seconds, 3),
        versions=_versions(),
        run=run,
        ranks=ranks,
    )
