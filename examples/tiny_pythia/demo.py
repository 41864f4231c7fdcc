"""The paper's study in miniature, on two small trajectories trained here: `make demo`.

Trains (once) two Pythia-architecture runs on the standard library's source that differ only in
learning rate (a high one and one 10x lower), then runs the real `ckptavg` commands on them: one
study file (LAWA with k=5 every `interval` steps, the EMA and SWA baselines, WMA and a 1-sqrt
decay-shaped merge over the same checkpoints, each scored with a perplexity task over the held-out
standard-library files as it is made), `ckptavg results`, the plots, and `ckptavg savings`. Every
command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import reproducible  # noqa: E402

reproducible.pin()  # inherited by every command below, training and scoring alike
TASK = "stdlib-heldout"
METRIC = "bits_per_byte"  # linear in the loss; word perplexity of source code runs into the millions
GPU_HOURS = 0.05  # what one training run costs, stated (a measured time would change every run's output)


def run(*cmd: object) -> None:
    args = [str(c) for c in cmd]
    shown = " ".join(shlex.quote(a) for a in args).replace(sys.executable + " -m ckptavg", "ckptavg")
    print(f"\n$ {shown}", flush=True)
    subprocess.run(args, check=True)


def ckptavg(*args: object) -> None:
    run(sys.executable, "-m", "ckptavg", *args)


def summary(results: Path, names: list[str], lawa: str) -> None:
    """Where LAWA beats the original, by how much: the numbers the README quotes."""
    from ckptavg.report.store import open_results

    with open_results(results) as db:
        rows = db.rows(task=TASK, metric=METRIC)
    print(f"\nheld-out {METRIC}, {lawa} vs original (negative: the average is better)")
    for name in names:
        orig = {r.step: r.value for r in rows if r.model == name and r.tag == "original"}
        avg = {r.step: r.value for r in rows if r.model == name and r.tag == lawa}
        steps = sorted(set(orig) & set(avg))
        better = [s for s in steps if avg[s] < orig[s]]
        change = {s: 100 * (avg[s] / orig[s] - 1) for s in steps}
        best = min(steps, key=change.get)
        print(f"  {name}: better at {len(better)} of {len(steps)} steps; largest gain {change[best]:+.1f}% at step "
              f"{best}; at the last step {change[steps[-1]]:+.1f}%")


def _toml(value: object) -> str:
    """A TOML value for the strings, numbers and lists a study file holds (the same syntax as JSON's)."""
    return json.dumps(value)


def study_file(names: list[str], k: int, nu: int, interval: int, steps: int, ema_alpha: float) -> str:
    """The demo's study: both trajectories, LAWA, the EMA and SWA baselines, WMA and a 1-sqrt decay-shaped
    merge over the same checkpoints,
    scored on the held-out files; paths relative to the demo's --out. examples/tiny_pythia/study.toml is
    this with the defaults."""
    first = (k - 1) * nu + interval  # the first full window on the interval grid
    lines = ["# The demo's study (written by examples/tiny_pythia/demo.py; run it with --root OUT)",
             'out = "averaged"', 'results = "results.sqlite"', 'device = "cpu"', "",
             "[steps]", f"start = {first}", f"end = {steps}", f"interval = {interval}", ""]
    for name in names:
        lines += ["[[sources]]", f"local = {_toml('trajectories/' + name)}", ""]
    for method, extra in (("lawa", ""), ("ema", f"ema_alpha = {_toml(ema_alpha)}\n"), ("swa", ""), ("wma", ""),
                          ("decay", 'decay_shape = "1-sqrt"\n')):
        lines += ["[[runs]]", f"method = {_toml(method)}", f"k = {k}", f"nu = {nu}", extra]
    lines += ["[scoring]", f"tasks = {_toml([TASK])}", f"ppl_task = {_toml([TASK + '=heldout.jsonl'])}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--figures", type=Path, help="where the PNGs go (default: OUT/figures)")
    ap.add_argument("--lr", type=float, default=1e-2, help="the high learning rate; the low one is 10x lower")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--nu", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--interval", type=int, default=100)
    ap.add_argument("--ema-alpha", type=float, default=0.5)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long model and run, for the test suite")
    args = ap.parse_args()
    out, figures = args.out, args.figures or args.out / "figures"
    began = time.time()
    lrs = [args.lr, args.lr / 10]
    names = [f"tiny-pythia-lr{lr:g}" for lr in lrs]
    heldout = out / "heldout.jsonl"
    size = (["--width", "32", "--vocab", "300", "--ctx", "64", "--batch", "4", "--heldout-chars", "300",
             "--max-files", "10"] if args.tiny
            else ["--heldout-chars", "1500"])
    for lr, name in zip(lrs, names, strict=True):
        run(sys.executable, HERE / "train.py", "--out", out / "trajectories" / name, "--lr", lr, "--steps", args.steps,
            "--every", args.nu, "--heldout", heldout, *size)

    # LAWA and the EMA and SWA baselines on both trajectories, scored as they are made: one study file
    study = out / "study.toml"
    study.write_text(study_file(names, args.k, args.nu, args.interval, args.steps, args.ema_alpha))
    print(f"\n{study}:\n{study.read_text()}")
    ckptavg("study", "run", study, "--root", out, "--quiet")
    results = out / "results.sqlite"
    ckptavg("results", results, "--metric", METRIC)

    lawa = f"lawa-k{args.k}-nu{args.nu}"
    for lr, name in zip(lrs, names, strict=True):
        ckptavg("plot", results, "--task", TASK, "--metric", METRIC, "--model", name, "--compare", "lawa", "--out",
                figures / f"lawa-vs-original-lr{lr:g}.png", "--title", f"{name}: held-out bits per byte")
    ckptavg("plot", results, "--task", TASK, "--metric", METRIC, "--model", names[0], "--compare",
            "lawa,ema,swa,wma,decay", "--out", figures / "methods.png", "--title",
            f"{names[0]}: LAWA, EMA, SWA, WMA and 1-sqrt decay")
    seconds = json.loads((out / "trajectories" / names[0] / "training.json").read_text())["seconds"]
    print(f"\n(--gpu-hours {GPU_HOURS}: a stated round figure; the high-learning-rate run took {seconds / 3600:.3f} "
          f"hours to train here, on CPU)")
    ckptavg("savings", results, "--model", ",".join(names), "--tag", lawa, "--task", TASK, "--metric", METRIC,
            "--tolerance",
            "0,1,2,5,10", "--total-steps", args.steps, "--gpu-hours", GPU_HOURS, "--plot",
            figures / "savings.png")
    summary(results, names, lawa)
    record = {"seconds": round(time.time() - began, 1)}
    (out / "demo.json").write_text(json.dumps(record))
    print(f"\ndemo finished in {record['seconds']:.0f} s; figures in {figures}")


if __name__ == "__main__":
    main()
