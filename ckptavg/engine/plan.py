"""Pure planning of one weighted average: which tensors, which action, which output shard.

Everything here works on metadata (`TensorRef`s) and never touches tensor data, so every
inconsistency between the inputs is found before a single byte is read or written.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import formats, outputs
from ..checkpoints.index import Checkpoint, TensorRef
from ..errors import MismatchError, WeightsError

# Buffers that ride along in real Pythia checkpoints but are not trained weights: averaging
# them is meaningless at best (a causal mask) and lossy at worst (masked_bias = -1e9).
DEFAULT_COPY_PATTERNS = (
    "*.attention.bias",
    "*.attention.masked_bias",
    "*.rotary_emb.inv_freq",
    "*.rotary_emb.original_inv_freq",
)
WEIGHT_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: the weighted sum of `sources`, or a copy of the newest source."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: str  # "average" | "copy"
    sources: tuple[TensorRef, ...]  # one per input for "average"; the newest input's for "copy"
    reason: str = ""  # why a tensor is copied
    accumulate: torch.dtype = torch.float32  # what an "average" is summed in (see `accumulation_dtype`)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One output file: `frames[0]`, the first job's bytes, `frames[1]`, ..., `frames[-1]`, where the
    frames are what the output format puts around the tensors (`checkpoints/outputs.py`)."""

    filename: str
    jobs: tuple[TensorJob, ...]
    frames: tuple[bytes, ...] = ()  # len(jobs) + 1; empty: none at all (the tensors back to back)

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs) + sum(len(f) for f in self.frames)


@dataclass(frozen=True)
class AveragePlan:
    weights: tuple[float, ...]
    shards: tuple[Shard, ...]
    copied: dict[str, str] = field(default_factory=dict)  # name -> reason
    absent: tuple[tuple[str, ...], ...] = ()  # per input: the buffers it lacks (never averaged ones only)
    copy_patterns: tuple[str, ...] = ()
    # input files that a later average reads again: the engine keeps them in the page cache if they fit
    reread: frozenset[Path] = frozenset()
    format: str = "safetensors"  # the output's (`checkpoints.formats.OUTPUT_FORMATS`)
    extra_files: tuple[tuple[str, bytes], ...] = ()  # small files written whole: an index, DCP's .metadata

    @property
    def jobs(self) -> list[TensorJob]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards) + sum(len(b) for _, b in self.extra_files)

    @property
    def mean_of(self) -> int | None:
        """k when the weights are the uniform 1/k. The engine then sums the inputs and divides once:
        the sum of k 16-bit values is exact in float32, so the result rounds once, where k
        multiplications by an inexact 1/k would each round (1 ULP off in about 0.5% of a float16
        Pythia-1B average, against a float64 reference)."""
        k = len(self.weights)
        if len(set(self.weights)) == 1 and math.isclose(self.weights[0] * k, 1.0, rel_tol=1e-12):
            return k
        return None


def accumulation_dtype(sources: Sequence[TensorRef], asked: torch.dtype | None = None) -> torch.dtype:
    """float32 for 16-bit inputs and float64 for wider ones, unless one is asked for: the narrowest dtype
    in which the sum is exact, so that the average is the float64 mean cast once whatever the input
    dtype. (A float32 sum of float32 checkpoints is not: OLMo-core's own fp32 merge of three steps is up
    to 55 ulp off on small elements.)"""
    if asked is not None:
        return asked
    return torch.float64 if max(r.dtype.itemsize for r in sources) >= 4 else torch.float32


def uniform_weights(n: int) -> tuple[float, ...]:
    return tuple([1.0 / n] * n)


def check_weights(weights: Sequence[float], n_inputs: int, normalized: bool = True) -> tuple[float, ...]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != n_inputs:
        raise WeightsError(f"got {len(weights)} weights for {n_inputs} inputs")
    if not all(math.isfinite(w) for w in weights):
        raise WeightsError(f"weights must be finite numbers, got {list(weights)}")
    if normalized and abs(math.fsum(weights) - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise WeightsError(
            f"weights sum to {math.fsum(weights):.6g}, not 1 (pass --no-normalize to use them as given)"
        )
    return weights


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def plan_average(
    checkpoints: Sequence[Checkpoint],
    weights: Sequence[float],
    *,
    out_dtype: torch.dtype | None = None,
    accumulate: torch.dtype | None = None,
    shard_bytes: int = 5 * 10**9,
    copy_patterns: Sequence[str] = DEFAULT_COPY_PATTERNS,
    reread: Collection[int] = (),
    output_format: str = "safetensors",
    source: object = None,
) -> AveragePlan:
    """Plan `sum_i weights[i] * checkpoints[i]`; the last checkpoint is the newest. `reread` (positions)
    names the checkpoints a later average will read again (a sliding window's shared members).

    `out_dtype=None` keeps each tensor's dtype as stored in the newest checkpoint. Tensors
    that are not floating point, or that match `copy_patterns`, are copied from the newest
    checkpoint, and may be absent from some inputs (see `_check_names`). Output tensors follow
    the newest checkpoint's on-disk order (grouped by item size, so every tensor stays aligned),
    which keeps all reads sequential when the inputs share a layout, as consecutive checkpoints
    of one run do. `output_format` is one of `formats.OUTPUTS` ("dcp": one file, whatever `shard_bytes`),
    and `source` what that format's `source` read of the newest input (the "torch" format's saved object, the
    "dcp" format's non-tensor entries): read by the caller, so that planning reads nothing.
    """
    if not checkpoints:
        raise MismatchError("no checkpoints to average")
    if accumulate not in (None, torch.float32, torch.float64):
        raise ValueError("accumulate must be None (each tensor's own), float32 or float64")
    if out_dtype is not None and not _is_float(out_dtype):
        raise ValueError("out_dtype must be a floating point dtype")
    newest = checkpoints[-1]
    _check_trainers(checkpoints)
    absent = _check_names(checkpoints, copy_patterns)
    ordered = list(newest.tensors.values())
    if all(r.offset is not None for r in ordered):
        ordered.sort(key=lambda r: (newest.files.index(r.file), r.offset))
    jobs, copied = [], {}
    for ref in ordered:
        reason = copy_reason(ref.name, [ref], copy_patterns)
        if reason:
            copied[ref.name] = reason
            jobs.append(TensorJob(ref.name, ref.shape, ref.dtype, "copy", (ref,), reason))
            continue
        refs = [c.tensors[ref.name] for c in checkpoints]
        for c, r in zip(checkpoints, refs, strict=True):
            if r.shape != ref.shape:
                raise MismatchError(
                    f"tensor {ref.name!r} has shape {list(r.shape)} in {c.shown} "
                    f"but {list(ref.shape)} in {newest.shown}"
                )
            if _is_float(r.dtype) != _is_float(ref.dtype):
                raise MismatchError(
                    f"tensor {ref.name!r} is {r.dtype} in {c.shown} but {ref.dtype} in {newest.shown}"
                )
        jobs.append(TensorJob(ref.name, ref.shape, out_dtype or ref.dtype, "average", tuple(refs),
                              accumulate=accumulation_dtype(refs, accumulate)))
    # Itemsize-descending order keeps every tensor aligned in the contiguous safetensors layout,
    # also after a dtype change.
    jobs.sort(key=lambda j: -j.out_dtype.itemsize)
    shards, extra = lay_out(jobs, shard_bytes, output_format, outputs.Newest(newest.trainer, source))
    return AveragePlan(check_weights(weights, len(checkpoints), normalized=False), shards, copied, absent,
                       tuple(copy_patterns), frozenset(f for i in reread for f in checkpoints[i].files),
                       output_format, extra)


def lay_out(jobs: Sequence[TensorJob], shard_bytes: int, output_format: str, newest: outputs.Newest
            ) -> tuple[tuple[Shard, ...], tuple[tuple[str, bytes], ...]]:
    """The output files for `jobs` in `output_format`: their jobs in the order the format writes them,
    the frames between, and the small files that describe them."""
    if output_format not in formats.OUTPUTS:
        raise ValueError(f"output format {output_format!r} is not one of {formats.OUTPUT_FORMATS}")
    layout = formats.OUTPUTS[output_format].layout([(j.name, j.out_dtype, j.shape) for j in jobs], shard_bytes,
                                                   newest)
    by_name = {j.name: j for j in jobs}
    shards = tuple(Shard(f.filename, tuple(by_name[n] for n in f.names), f.frames) for f in layout.files)
    return shards, layout.extra


def _check_trainers(checkpoints: Sequence[Checkpoint]) -> None:
    """One average, one trainer's layout: names that happen to match across trainers mean nothing."""
    def family(trainer: str) -> str:  # a plain state dict, in a model folder or a file of its own, is one
        return "state dict" if trainer in ("transformers", "torch") else trainer

    for c in checkpoints:
        if family(c.trainer) != family(checkpoints[-1].trainer):
            raise MismatchError(f"{c.shown} was saved by {c.trainer} but {checkpoints[-1].shown} by "
                                f"{checkpoints[-1].trainer}: one average takes one trainer's checkpoints")


def copy_reason(name: str, refs: Sequence[TensorRef], copy_patterns: Sequence[str]) -> str:
    """Why a tensor is copied from the newest input instead of averaged ("" when it is averaged):
    it is not floating point in some input, or its name matches a non-trained buffer pattern."""
    odd = next((r.dtype for r in refs if not _is_float(r.dtype)), None)
    if odd is not None:
        return f"{str(odd).removeprefix('torch.')} buffer, not averaged"
    if any(fnmatch.fnmatchcase(name, p) for p in copy_patterns):
        return "non-trained buffer, not averaged"
    return ""


def _check_names(checkpoints: Sequence[Checkpoint], copy_patterns: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Which tensors each input lacks, where that is allowed: only tensors that are never averaged.

    Checkpoints written by different library versions differ in their buffers (Pythia's
    transformers-4.24 `.bin` files carry causal masks and rotary frequencies that later
    safetensors files do not), so a buffer may be absent from some inputs: the output holds it
    exactly when the newest input does. A trained tensor absent from any input is an error.
    """
    newest = checkpoints[-1]
    everywhere: dict[str, list[TensorRef]] = {}
    for c in checkpoints:
        for name, ref in c.tensors.items():
            everywhere.setdefault(name, []).append(ref)
    trained_gaps = []
    absent: list[list[str]] = [[] for _ in checkpoints]
    for name, refs in everywhere.items():
        if len(refs) == len(checkpoints):
            continue
        for i, c in enumerate(checkpoints):
            if name not in c.tensors:
                absent[i].append(name)
        # the newest input decides, as it does for the tensors every input holds
        if not copy_reason(name, [newest.tensors[name]] if name in newest.tensors else refs, copy_patterns):
            trained_gaps.append(name)
    if trained_gaps:
        name = trained_gaps[0]
        lacking = next(c for c in checkpoints if name not in c.tensors)
        where = (f"is missing from {lacking.shown}" if lacking is not newest else
                 f"is in {next(c for c in checkpoints if name in c.tensors).shown} but not in {newest.shown}")
        raise MismatchError(f"tensor names differ ({len(trained_gaps)} trained tensor(s)): {name!r} {where} "
                            f"(only buffers that are never averaged may be absent; --copy PATTERN names more)")
    return tuple(tuple(sorted(a)) for a in absent)
