"""`ckptavg average` and `ckptavg interpolate`: local checkpoints in, one model folder out per average."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import options as opt
from ..units import format_size
from .console import app, say, user_errors
from .groups import Arithmetic, Launch, Submit, grouped
from .progress import Bars


@app.command()
@user_errors
@grouped(arith=Arithmetic, launch=Launch, submit=Submit)
def average(
    srcs: list[str] = typer.Argument(..., help="Checkpoint folders (or weight files), oldest first, local or "
                                     "on an object store (s3://bucket/run/step1000, any fsspec URL; credentials "
                                     "the store's standard way, e.g. AWS_* variables). The last one is the newest: "
                                     "config, tokenizer and every tensor that is not averaged are taken from it."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face model folder for "
                                "safetensors), or a prefix on an object store (s3://bucket/avg): its files are "
                                "put as they are computed, ckptavg.json last, so a reader never takes an "
                                "unfinished output for a finished one."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weights, one per SRC, in SRC "
                                          "order (default: uniform 1/n)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize",
                                   help="Require the weights to sum to 1; --no-normalize uses them as given."),
    accumulate: str = typer.Option("auto", help="Accumulation precision: auto (float32 for 16-bit inputs, "
                                   "float64 for float32 ones: the float64 mean cast once either way), "
                                   "float32 (faster on float32 inputs, not exact), or float64."),
    shard_size: str = typer.Option("5GB", help="Largest output shard (e.g. 5GB, 500MiB); "
                                   "larger outputs are split, with a model.safetensors.index.json (DCP "
                                   "outputs: into __0_0.distcp, __1_0.distcp, ...)."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    hash_inputs: bool = typer.Option(True, "--hash/--no-hash", help="Record each input file's sha256 in "
                                     "the manifest: computed from the bytes the average reads anyway, "
                                     "cached per file, free for Hugging Face cache files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    arith: Arithmetic = None, launch: Launch = None, submit: Submit = None,
) -> None:
    """Average local checkpoints tensor by tensor into a new model folder.

    Inputs may be model.safetensors, sharded safetensors with an index, pytorch_model.bin,
    sharded .bin with an index, or a torch.distributed.checkpoint folder (whole or FSDP-sharded
    tensors; model tensors only), in any mix. Floats are accumulated in a dtype in which the sum is
    exact (float32 for 16-bit inputs, float64 for float32 ones) and cast once; integer and boolean
    buffers are copied from the newest input. The output is written under a temporary name and
    appears only when complete, with ckptavg.json last.

    Launched by torchrun or srun (`torchrun --nproc-per-node 8 -m ckptavg average ...`, `srun -n 8 ckptavg
    average ...`), the ranks share one average: each writes some of the output files, rank 0 commits. Run the
    same command again after a failure: the files that were finished are kept. `--executor slurm` submits
    that launch as a Slurm job from here and waits for it.
    """
    dtype = opt.choice(arith.dtype, opt.AVERAGE_DTYPES, "--dtype")
    acc = opt.choice(accumulate, opt.ACCUMULATE_DTYPES, "--accumulate")
    w = opt.floats(weights, "--weights") if weights else None
    shard_bytes, patterns = opt.size(shard_size, "--shard-size"), opt.copy_patterns(arith.copy)
    output_format = opt.choice(arith.output_format, opt.OUTPUT_FORMATS, "--output-format")
    opt.device(arith.device)
    ranks = launch.ranks()  # launched by torchrun or srun: one of several ranks sharing the average
    job = submit.job(ranks)
    if job is not None:
        return _submitted(srcs, out_dir, job, w, normalize, dtype, acc, shard_bytes, force, hash_inputs, patterns,
                          output_format, launch.timeout, arith.device)
    quiet = quiet or bool(ranks and ranks.rank)
    if hash_inputs and ranks is None:  # checked options first, then, before torch is imported, while a core idles
        from .. import hash_ahead
        from ..checkpoints.layouts import likely_weight_files
        from ..storage.base import is_url

        hash_ahead.start([f for s in srcs if not is_url(s) for f in likely_weight_files(Path(s))])
    from ..api import output_summary, resolve_device, torch_dtype
    from ..engine.average import average_checkpoints

    out_dtype, acc_dtype, device = torch_dtype(dtype), torch_dtype(acc), resolve_device(arith.device)
    with Bars(quiet) as bars:
        result = average_checkpoints(srcs, out_dir, weights=w, normalize=normalize, out_dtype=out_dtype,
                                     accumulate=acc_dtype, device=device, shard_bytes=shard_bytes, force=force,
                                     hash_inputs=hash_inputs, copy=patterns, output_format=output_format,
                                     progress=bars.for_plan("averaging"), ranks=ranks, timeout=launch.timeout)
    if ranks is None or ranks.rank == 0:
        size, seconds = output_summary(result)
        shared = f", {ranks.world} ranks" if ranks else ""
        say(f"wrote {result} ({format_size(size)}, {len(srcs)} inputs{shared}, {seconds:.1f} s)")


def _submitted(srcs, out_dir, job, weights, normalize, dtype, acc, shard_bytes, force, hash_inputs, patterns,
               output_format, timeout, device) -> None:
    from ..api import output_summary, torch_dtype
    from ..api.cluster import submit_average

    say(f"submitting one average of {len(srcs)} inputs as a Slurm job of {job.nodes} x {job.tasks_per_node} ranks")
    result, job_id = submit_average(srcs, out_dir, job, force=force, weights=weights, normalize=normalize,
                                    out_dtype=torch_dtype(dtype), accumulate=torch_dtype(acc), device=device,
                                    shard_bytes=shard_bytes, hash_inputs=hash_inputs, copy=patterns,
                                    output_format=output_format, timeout=timeout)
    size, seconds = output_summary(result)
    say(f"wrote {result} ({format_size(size)}, {len(srcs)} inputs, {job.nodes * job.tasks_per_node} ranks, Slurm "
        f"job {job_id}, {seconds:.1f} s)")


@app.command()
@user_errors
@grouped(arith=Arithmetic, launch=Launch, submit=Submit)
def interpolate(
    a: str = typer.Argument(..., help="Checkpoint A (a path, or a URL on an object store)."),
    b: str = typer.Argument(..., help="Checkpoint B (config, tokenizer and non-averaged tensors come from B)."),
    alphas: str = typer.Option("0,0.2,0.4,0.6,0.8,1", help="Comma-separated alphas; each output is "
                               "alpha*A + (1-alpha)*B (values outside [0, 1] extrapolate)."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Outputs go to OUT/alpha{ALPHA}/ (OUT may be a prefix "
                                "on an object store, s3://bucket/lmc)."),
    force: bool = typer.Option(False, "--force", help="Redo finished outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    arith: Arithmetic = None, launch: Launch = None, submit: Submit = None,
) -> None:
    """Linear interpolation between two checkpoints, a probe of linear mode connectivity.

    Launched by torchrun or srun, the ranks share each interpolation in turn (as `ckptavg average` does);
    `--executor slurm` submits that launch as a Slurm job from here and waits for it."""
    from ..api import interpolate as run

    ranks = launch.ranks()
    if submit.submitted(ranks):
        return
    with Bars(quiet or bool(ranks and ranks.rank)) as bars:
        done = run(a, b, opt.floats(alphas, "--alphas"), out_dir, device=arith.device, dtype=arith.dtype,
                   copy=arith.copy, force=force, output_format=arith.output_format,
                   progress=lambda alpha: bars.for_plan(f"alpha {alpha:g}"), ranks=ranks, timeout=launch.timeout)
    if ranks is None or ranks.rank == 0:
        for _, folder, written in done:
            say(f"wrote {folder}" if written else f"skipped {folder} (finished)")
