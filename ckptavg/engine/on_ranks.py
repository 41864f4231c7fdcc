"""One average shared by the ranks of a `torchrun` or `srun` launch: prepare, execute a share, commit.

    prepare   every rank opens the inputs and plans; they check they planned the same (a digest of the plan)
    create    rank 0 takes the output's lock and makes its folder, named by the plan (`ranked_output.py`)
    execute   every rank writes its share of the output files (dealt out by bytes) and hashes the input files
              it owns, skipping the files a failed attempt of the same plan finished
    commit    rank 0, once every rank is done: the index or `.metadata`, side files, the manifest last

A failure on any rank stops them all, with the failing rank's line (`_together`); a rank that falls silent
(killed, its node lost) stops them within the timeout (`ranks.Group.wait`). Nothing is committed then, and
the finished files stay in the hidden folder for the same command to take up again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoints.formats import OUTPUTS
from ..checkpoints.index import Checkpoint
from ..errors import CkptavgError, InputError, RankError
from ..hashing import file_sha256, known_sha256
from ..manifest import Method, Provenance, RunId
from ..storage.paths import RemotePath, location
from .average import Inputs, _copy_side_files, _manifest, _open_and_plan
from .pipeline import Progress, execute_plan, resolve_device
from .plan import AveragePlan
from .ranked_output import RankedOutput, RankedRemoteOutput
from .ranks import Group, Ranks
from .writer import write_extra_files


def _together(group: Group, step: Callable[[], object]) -> object:
    """`step` on this rank, then, if it failed on any rank, an error on every one (on a rank where it failed,
    its own error, a bug's with its traceback; elsewhere a `RankError` naming the rank and what it said at
    once, rather than after the timeout its silence would take), so that no rank goes on alone."""
    try:
        result, error = step(), None
    except Exception as e:  # noqa: BLE001  (said to the others, then raised here as it is)
        result, error = None, e
    if error is not None and not isinstance(error, (CkptavgError, OSError)):  # (a bug: say what kind)
        line = f"{type(error).__name__}: {error}"
    else:
        line = None if error is None else str(error)
    said = group.gather(None if line is None else (line.splitlines() or ["?"])[0])
    if error is not None:
        raise error
    failed = next(((r, line) for r, line in enumerate(said) if line is not None), None)
    if failed is not None:
        raise RankError(f"rank {failed[0]} of {len(said)} failed: {failed[1]}")
    return result


def shares(plan: AveragePlan, world: int) -> list[list[int]]:
    """The output files each rank writes (indices into `plan.shards`): the largest first, each to the rank
    with the fewest bytes so far, so that the ranks' shares differ by at most one file."""
    out: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(plan.shards)), key=lambda i: -plan.shards[i].nbytes):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += plan.shards[i].nbytes
    return [sorted(s) for s in out]


def hash_owners(plan: AveragePlan, files: Sequence[Path], mine: Sequence[Sequence[int]]) -> list[list[Path]]:
    """The input files each rank hashes whole (a sha256 is sequential: one rank per file): the rank that reads
    the most of a file already, so that its hasher takes those bytes as the average reads them and reads only
    the rest (ties, and files no output needs, go to the rank with the fewest bytes to hash)."""
    reads: dict[Path, list[int]] = {f: [0] * len(mine) for f in files}
    for r, indices in enumerate(mine):
        for i in indices:
            for job in plan.shards[i].jobs:
                for ref in job.sources:
                    if ref.file in reads:
                        reads[ref.file][r] += job.numel * ref.dtype.itemsize
    owned: list[list[Path]] = [[] for _ in mine]
    extra = [0] * len(mine)
    for f in files:
        size = f.stat().st_size
        r = min(range(len(mine)), key=lambda r: (-reads[f][r], extra[r], r))
        owned[r].append(f)
        extra[r] += size - reads[f][r]
    return owned


def plan_digest(plan: AveragePlan, checkpoints: Sequence[Checkpoint]) -> str:
    """What every rank must agree on, and what names the output's temporary folder (so that a rerun of the
    same average, and only of it, takes up a failed attempt's files): the inputs (paths, sizes, times of
    change), the weights and every output file's tensors."""
    def version(f: Path | RemotePath) -> tuple:
        st = f.stat()  # (a local file's time of change; an object's ETag)
        return st.st_size, getattr(st, "st_mtime_ns", None) or getattr(st, "identity", None)

    inputs = [(str(c.path.absolute()), [(str(f), *version(f)) for f in c.files]) for c in checkpoints]
    shards = [(s.filename, [(j.name, j.shape, str(j.out_dtype), j.action, str(j.accumulate)) for j in s.jobs])
              for s in plan.shards]
    return hashlib.sha256(repr((plan.weights, plan.format, plan.copy_patterns, inputs, shards)).encode()).hexdigest()


def average_on_ranks(ranks: Ranks | Group, inputs: Inputs, out: str | os.PathLike | RemotePath, *, timeout: float,
                     weights: Sequence[float] | None, normalize: bool, out_dtype: torch.dtype | None,
                     accumulate: torch.dtype | None, device: str | torch.device, shard_bytes: int,
                     output_format: str, force: bool, hash_inputs: bool, copy: Sequence[str],
                     method: Method | None, provenance: Sequence[Provenance] | None, run: RunId | None,
                     piece_elements: int, progress: Callable[[AveragePlan], Progress | None] | None
                     ) -> Path | RemotePath:
    """`average_checkpoints` as one of `ranks`: the same output, bit for bit, in less time. Given a `Group`
    (a command that makes several averages joins once), the caller leaves it."""
    own = not isinstance(ranks, Group)
    group = Group(ranks, timeout) if own else ranks
    ranks = group.ranks
    first = ranks.rank == 0
    output: RankedOutput | RankedRemoteOutput | None = None
    finished = False
    try:
        def prepare() -> tuple[list[Checkpoint], AveragePlan]:
            checkpoints, plan = _open_and_plan(inputs, weights, normalize, copy, out_dtype=out_dtype,
                                               accumulate=accumulate, shard_bytes=shard_bytes,
                                               output_format=output_format)
            # files small enough for every rank to have one
            per_rank = -(-sum(s.nbytes for s in plan.shards) // ranks.world)
            if per_rank < shard_bytes and OUTPUTS[plan.format].shards:
                checkpoints, plan = _open_and_plan(checkpoints, weights, normalize, copy, out_dtype=out_dtype,
                                                   accumulate=accumulate, shard_bytes=max(per_rank, 1),
                                                   output_format=output_format)
            return checkpoints, plan

        checkpoints, plan = _together(group, prepare)
        digest = plan_digest(plan, checkpoints)
        digests = group.gather(digest)
        if len(set(digests)) > 1:
            odd = next(r for r, d in enumerate(digests) if d != digests[0])
            raise InputError(f"rank {odd} planned another average than rank 0 (other inputs, options or files): "
                             f"every rank must run the same command on the same files")
        where = location(out)
        output = (RankedRemoteOutput(where, digest, force=force) if isinstance(where, RemotePath) else
                  RankedOutput(where, digest, force=force))
        _together(group, lambda: output.create(plan.output_bytes) if first else None)
        dealt = shares(plan, ranks.world)
        mine = [plan.shards[i] for i in dealt[ranks.rank] if not output.done(plan.shards[i])]
        files = sorted({f for c in checkpoints for f in c.files}, key=str) if hash_inputs else []
        owned = hash_owners(plan, files, dealt)[ranks.rank]
        # an object on a store may be overwritten while it is read: its version before and after must agree
        remote = {f: f.info() for c in checkpoints for f in c.files if isinstance(f, RemotePath)} if first else {}
        started = time.time()

        def execute() -> dict[str, tuple[str, str]]:
            return _execute(replace(plan, shards=tuple(mine), extra_files=()), output, checkpoints, owned,
                            device=device, piece_elements=piece_elements, progress=progress)

        named = {str(f): f for c in checkpoints for f in c.files}
        hashes = {named[f]: d for part in group.gather(_together(group, execute)) for f, d in part.items()}

        def commit() -> Path | None:
            if not first:
                return None
            changed = [f for f, before in remote.items() if f.info().identity != before.identity]
            if changed:
                raise InputError(f"{changed[0]} changed while it was being read (its ETag differs): nothing was "
                                 f"committed; run again once the run has finished writing it")
            write_extra_files(output.path, plan.extra_files)
            side = _copy_side_files(plan, checkpoints[-1], output.path)
            manifest = _manifest(plan, checkpoints, hashes if hash_inputs else None, remote, side,
                                 str(resolve_device(device)), time.time() - started, normalize=normalize,
                                 out_dtype=out_dtype, method=method, provenance=provenance, run=run,
                                 ranks=ranks.world)
            return output.commit(manifest, fsync_files=[output.path / n for n in side])

        result = location(group.from_first(str(_together(group, commit))))
        finished = True
        return result
    finally:
        if first and output is not None:
            output.release()  # (after a failure the folder stays: the same command takes it up again)
        if own:
            group.close(finished)


def _execute(share: AveragePlan, output: RankedOutput | RankedRemoteOutput, checkpoints: Sequence[Checkpoint],
             owned: Collection[Path],
             *, device: str | torch.device, piece_elements: int,
             progress: Callable[[AveragePlan], Progress | None] | None) -> dict[str, tuple[str, str]]:
    """This rank's output files, each marked done once durable, and the sha256 of each input file it owns
    (remembered, known already, or computed: from the bytes its share reads where it can)."""
    hashes = {str(f): known for f in owned if (known := known_sha256(f)) is not None}
    mapped = {r.file for c in checkpoints for r in c.tensors.values() if r.offset is None}
    in_pass = [f for f in owned if str(f) not in hashes and f not in mapped] if share.shards else []
    with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-hash") as pool:
        apart = {f: pool.submit(file_sha256, f) for f in owned if str(f) not in hashes and f not in in_pass}
        if share.shards:
            hashers = execute_plan(share, output.path, device=resolve_device(device), piece_elements=piece_elements,
                                   progress=progress(share) if progress else None, hash_files=in_pass,
                                   on_file=output.mark)
            for f, hasher in hashers.items():
                hasher.remember()
                hashes[str(f)] = (hasher.hexdigest(), "computed")
        hashes.update((str(f), fut.result()) for f, fut in apart.items())
    return hashes
