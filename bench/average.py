"""ckptavg against the I/O floor, mergekit and a naive load-everything average, on Pythia-shaped inputs.

Builds synthetic float16 checkpoints once under bench/data/, one folder per shape, then, in one run and
for each case and repetition, measures:

  floor     reading every input once (sequential 16 MB readinto) + writing one output of the
            same size and fsyncing it, the way ckptavg flushes its own
  ckptavg   `python -m ckptavg average ... --no-hash` (wall time of the whole command,
            interpreter and torch import included) and its peak RssAnon
  +hash     the same with input sha256 computed (fresh hash cache): the manifest's default
  floor+hash  the floor of a hashed average: every input read and sha256-hashed on all cores (whole files
            in turn) while the output is written as above, at once; +hash is also given as a ratio to it
  naive     load every file fully (safetensors.torch.load_file), sum in float32, save_file
  mergekit  with --mergekit PATH: `mergekit-yaml` linear merge of the same inputs (float16 output)
  ranks=N   with --ranks 2,3: the same command (--no-hash) launched as N ranks sharing the average (the
            variables srun or torchrun give each rank), on the same cores; its time as a ratio to the floor
            and to the one-process command of the same repetition, the largest per-rank peak RssAnon, and the
            same launch hashing its inputs (each file hashed whole by one rank) as a ratio to it
  baseline  with --baseline DIR: the same two commands from another ckptavg checkout (an earlier commit:
            `git worktree add /tmp/base HEAD~1`), so that a change is measured before and after in
            the same repetitions

Cases (--cases): `1b` (k=5 Pythia-1B-shaped checkpoints, 2.09 GB each), `1b-k10` (k=10 of them),
`12b` (k=5 checkpoints with Pythia-12B's embeddings, 50688 x 5120, and two of its 36 layers: 2.30 GB
each), `1b-s3` (the `1b` inputs on a local S3 server, SeaweedFS from tests/s3server.py, averaged by URL:
against a floor of plain concurrent ranged GETs of every object to memory + writing one output, and
against downloading every object, then averaging the local copies) and `1b-dcp` (k=5 float32 DCP
saves of Pythia-1B's trained tensors, each row-sharded by two gloo ranks as FSDP saves them, 4.05 GB
each; model tensors only; the output is a DCP checkpoint). Warm runs
read from the page cache, so they are skipped where the inputs do not fit in half the machine's memory;
cold runs drop it first (root only). Speeds are reported as ratios to the floor taken in the same
repetition; min, median and max over repetitions.
Timings are noisy on shared machines: never put them in a test.

    python bench/average.py [--reps 3] [--cases 1b,12b,1b-k10] [--cold/--no-cold] [--naive-reps 1]
                            [--mergekit PATH] [--baseline DIR] [--ranks 2,3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Shape:
    """A GPT-NeoX (Pythia) architecture, or the first `layers` layers of one."""

    name: str
    layers: int
    d: int
    ff: int
    vocab: int
    heads: int
    ctx: int = 2048


PYTHIA_1B = Shape("pythia-1b", layers=16, d=2048, ff=8192, vocab=50304, heads=8)
PYTHIA_12B_2_LAYERS = Shape("pythia-12b-2-layers", layers=2, d=5120, ff=20480, vocab=50688, heads=40)
CASES = {"1b": (PYTHIA_1B, 5), "12b": (PYTHIA_12B_2_LAYERS, 5), "1b-k10": (PYTHIA_1B, 10), "1b-dcp": (PYTHIA_1B, 5),
         "1b-s3": (PYTHIA_1B, 5)}
DCP_RANKS = 2


def pythia_shapes(shape: Shape) -> dict[str, tuple[tuple[int, ...], str]]:
    D, FF, ctx = shape.d, shape.ff, shape.ctx
    rot = D // shape.heads // 8  # rotary_pct 0.25 of the head size, inv_freq holds half of that
    s: dict[str, tuple[tuple[int, ...], str]] = {"gpt_neox.embed_in.weight": ((shape.vocab, D), "f16")}
    for i in range(shape.layers):
        p = f"gpt_neox.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            s[p + n + ".weight"] = ((D,), "f16")
            s[p + n + ".bias"] = ((D,), "f16")
        s[p + "attention.bias"] = ((1, 1, ctx, ctx), "bool")
        s[p + "attention.masked_bias"] = ((), "f16")
        s[p + "attention.rotary_emb.inv_freq"] = ((rot,), "f32")
        s[p + "attention.query_key_value.weight"] = ((3 * D, D), "f16")
        s[p + "attention.query_key_value.bias"] = ((3 * D,), "f16")
        s[p + "attention.dense.weight"] = ((D, D), "f16")
        s[p + "attention.dense.bias"] = ((D,), "f16")
        s[p + "mlp.dense_h_to_4h.weight"] = ((FF, D), "f16")
        s[p + "mlp.dense_h_to_4h.bias"] = ((FF,), "f16")
        s[p + "mlp.dense_4h_to_h.weight"] = ((D, FF), "f16")
        s[p + "mlp.dense_4h_to_h.bias"] = ((D,), "f16")
    s["gpt_neox.final_layer_norm.weight"] = ((D,), "f16")
    s["gpt_neox.final_layer_norm.bias"] = ((D,), "f16")
    s["embed_out.weight"] = ((shape.vocab, D), "f16")
    return s


def build_inputs(data: Path, shape: Shape, k: int) -> list[Path]:
    """k checkpoints of `shape` under data/<shape name>/stepN, built once (a k=10 case reuses k=5's)."""
    import torch
    from safetensors.torch import save_file

    folders = [data / shape.name / f"step{1000 * (i + 1)}" for i in range(k)]
    for i, folder in enumerate(folders):
        if not (folder / "model.safetensors").is_file():
            print(f"building {folder} ...", flush=True)
            g = torch.Generator().manual_seed(i)
            sd = {}
            for name, (dims, kind) in pythia_shapes(shape).items():
                if kind == "bool":
                    sd[name] = torch.ones(dims, dtype=torch.bool).tril()
                elif kind == "f32":
                    sd[name] = torch.rand(dims, generator=g)
                else:
                    sd[name] = (torch.randn(dims, generator=g) * 0.02).half()
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / "model.safetensors.tmp"
            save_file(sd, tmp, metadata={"format": "pt"})
            os.replace(tmp, folder / "model.safetensors")
            del sd
        # a full config, so that tools that need the architecture (mergekit) can run
        (folder / "config.json").write_text(json.dumps(pythia_config(shape)))
    return folders


def _dcp_rank(rank: int, world: int, port: int, data: str, shape: Shape, k: int) -> None:
    """One rank of a row-sharded (FSDP-style, `Shard(0)`) float32 save of each step: its half of every
    trained tensor, as DTensors, written by DCP's own writer."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    trained = {n: dims for n, (dims, kind) in pythia_shapes(shape).items() if kind == "f16" and dims}
    for i in range(k):
        folder = Path(data) / f"step{1000 * (i + 1)}"
        if (folder / ".metadata").is_file():
            continue
        g = torch.Generator().manual_seed(1000 * i + rank)
        sd = {}
        for name, dims in trained.items():
            local = torch.randn((dims[0] // world, *dims[1:]), generator=g) * 0.02
            sd[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        dcp.save(sd, checkpoint_id=str(folder))
        del sd
    dist.destroy_process_group()


def build_dcp_inputs(data: Path, shape: Shape, k: int) -> list[Path]:
    """k float32 DCP checkpoints of `shape`'s trained tensors, each saved row-sharded by DCP_RANKS gloo
    ranks, under data/<shape name>-dcp/stepN (built once)."""
    import socket

    import torch.multiprocessing as mp

    root = data / f"{shape.name}-dcp"
    folders = [root / f"step{1000 * (i + 1)}" for i in range(k)]
    if not all((f / ".metadata").is_file() for f in folders):
        print(f"building {root} ({DCP_RANKS} ranks) ...", flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_dcp_rank, args=(DCP_RANKS, port, str(root), shape, k), nprocs=DCP_RANKS)
    return folders


def pythia_config(shape: Shape) -> dict:
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": shape.d,
            "intermediate_size": shape.ff, "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "vocab_size": shape.vocab, "max_position_embeddings": shape.ctx, "rotary_pct": 0.25,
            "rotary_emb_base": 10000, "use_parallel_residual": True, "tie_word_embeddings": False,
            "layer_norm_eps": 1e-5, "hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 0,
            "torch_dtype": "float16"}


def mergekit_config(folders: list[Path], path: Path) -> Path:
    """mergekit's `linear` method: the same uniform average, computed in float32, written in float16."""
    models = "".join(f"  - model: {f}\n    parameters:\n      weight: 1.0\n" for f in folders)
    path.write_text(f"merge_method: linear\ndtype: float32\nout_dtype: float16\nmodels:\n{models}")
    return path


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def floor_read(files: list[Path]) -> float:
    buf = bytearray(BLOCK)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def floor_write(path: Path, nbytes: int) -> float:
    buf = os.urandom(BLOCK)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(memoryview(buf)[: min(BLOCK, left)])
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def floor_hashed(files: list[Path], path: Path, nbytes: int) -> float:
    """Every input read and sha256-hashed by as many threads as cores, taking whole files in turn (a file's
    sha256 is one sequential stream; hashlib lets go of the GIL), while one more thread writes the output
    as floor_write does: the least a hashed average can take here, its arithmetic aside."""
    left, lock = list(files), threading.Lock()

    def hasher() -> None:
        buf = bytearray(BLOCK)
        while True:
            with lock:
                if not left:
                    return
                f = left.pop(0)
            h = hashlib.sha256()
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    h.update(memoryview(buf)[:n])

    threads = [threading.Thread(target=hasher) for _ in range(os.cpu_count() or 1)]
    threads.append(threading.Thread(target=floor_write, args=(path, nbytes)))
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall time and peak RssAnon (sampled every 5 ms from /proc) of a command. It runs in another folder:
    the working folder comes first on the import path, and would shadow PYTHONPATH's ckptavg."""
    with tempfile.TemporaryFile() as err:  # not a pipe: a child that fills one would wait on it forever
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tempfile.gettempdir())
        peak = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.005)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[:4]} failed:\n{err.read().decode()}")
    return dt, peak


def run_ranks_measured(cmd: list[str], ranks: int, env: dict) -> tuple[float, int]:
    """Wall time of `ranks` processes of `cmd` sharing one average (launched as srun launches tasks: each with
    its RANK), and the largest peak RssAnon of any of them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shared = dict(env, WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=dict(shared, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL,
                                  stderr=err, cwd=tempfile.gettempdir()) for r in range(ranks)]
        peaks = [0] * ranks
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                try:
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            peaks[i] = max(peaks[i], int(line.split()[1]) * 1024)
                except OSError:
                    pass
            time.sleep(0.005)
        dt = time.perf_counter() - t
        if any(p.returncode for p in procs):
            err.seek(0)
            raise SystemExit(f"{ranks} ranks of {cmd[:4]} failed:\n{err.read().decode()[-3000:]}")
    return dt, max(peaks)


NAIVE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
*inputs, out = sys.argv[1:]
sds = [load_file(p) for p in inputs]
avg = {}
for name, t in sds[-1].items():
    if not t.is_floating_point() or name.endswith(("attention.bias", "masked_bias", "inv_freq")):
        avg[name] = t
        continue
    acc = sds[0][name].float()
    for sd in sds[1:]:
        acc += sd[name].float()
    avg[name] = (acc / len(sds)).to(t.dtype)
save_file(avg, out, metadata={"format": "pt"})
"""


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def floor_ranged_gets(fs, keys: list[str], in_flight: int, chunk: int) -> float:
    """Every object read once into memory by ranged GETs, `in_flight` at a time, nothing kept."""
    from concurrent.futures import ThreadPoolExecutor

    ranges = [(key, a, min(a + chunk, size)) for key in keys for size in [fs.info(key)["size"]]
              for a in range(0, size, chunk)]
    t = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        for _ in pool.map(lambda r: len(fs.cat_file(r[0], start=r[1], end=r[2])), ranges):
            pass
    return time.perf_counter() - t


def bench_s3_case(case: str, args: argparse.Namespace, rows: dict[str, list[float]]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import s3fs
    from s3server import BUCKET, KEY, SECRET, S3Server

    from ckptavg.storage import remote

    shape, k = CASES[case]
    folders = build_inputs(args.data, shape, k)
    in_bytes = sum((f / "model.safetensors").stat().st_size for f in folders)
    out_bytes = in_bytes // k
    work = Path(tempfile.mkdtemp(prefix="ckptavg-bench-", dir=args.data))

    def record(key: str, value: float) -> None:
        rows.setdefault(f"{case} {key}", []).append(value)

    try:
        with S3Server(work / "s3") as server:
            auth = dict(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=server.endpoint)
            env = dict(os.environ, PYTHONPATH=str(ROOT), **auth)
            fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": server.endpoint})
            print(f"uploading {k} x {out_bytes / 1e9:.2f} GB to {server.endpoint} ...", flush=True)
            for f in folders:
                fs.put(str(f), f"{BUCKET}/{shape.name}/{f.name}", recursive=True)
            urls = [f"s3://{BUCKET}/{shape.name}/{f.name}" for f in folders]
            keys = [f"{BUCKET}/{shape.name}/{f.name}/model.safetensors" for f in folders]
            ckptavg = [sys.executable, "-m", "ckptavg", "average", "--out", str(work / "avg"), "--force", "-q",
                       "--device", args.device]
            print(f"\n{case}: {k} x {out_bytes / 1e9:.2f} GB float16 ({shape.name} shapes) on a local S3 server, "
                  f"{in_bytes / 1e9:.1f} GB in all; {os.cpu_count()} cores", flush=True)
            for rep in range(args.reps):
                floor = (floor_ranged_gets(fs, keys, remote.IN_FLIGHT, remote.CHUNK_BYTES)
                         + floor_write(work / "floor.bin", out_bytes))
                record("floor s", floor)
                plain, peak = run_measured(ckptavg + urls + ["--no-hash"], env)
                record("ckptavg/floor", plain / floor)
                record("ckptavg peak RssAnon MB", peak / 1e6)
                hashed, hpeak = run_measured(ckptavg + urls, dict(env, CKPTAVG_CACHE=str(work / f"cache-{rep}")))
                record("ckptavg+hash/floor", hashed / floor)
                record("ckptavg+hash peak RssAnon MB", hpeak / 1e6)
                t = time.perf_counter()  # download everything, then average the local copies
                local = work / "download"
                for url, f in zip(urls, folders, strict=True):
                    fs.get(url.removeprefix("s3://"), str(local / f.name), recursive=True)
                download = time.perf_counter() - t
                after, _ = run_measured(ckptavg + [str(local / f.name) for f in folders] + ["--no-hash"], env)
                shutil.rmtree(local)
                record("download-then-average/floor", (download + after) / floor)
                record("download-then-average/ckptavg", (download + after) / plain)
                print(f"rep {rep + 1}: floor {floor:.2f} s, ckptavg {plain:.2f} s (RssAnon {peak / 1e9:.2f} GB), "
                      f"+hash {hashed:.2f} s, download {download:.2f} s + average {after:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_case(case: str, args: argparse.Namespace, rows: dict[str, list[float]]) -> None:
    if case.endswith("-s3"):
        return bench_s3_case(case, args, rows)
    shape, k = CASES[case]
    if case.endswith("-dcp"):
        folders = build_dcp_inputs(args.data, shape, k)
        files = sorted(p for f in folders for p in f.glob("*.distcp"))
    else:
        folders = build_inputs(args.data, shape, k)
        files = [f / "model.safetensors" for f in folders]
    in_bytes = sum(f.stat().st_size for f in files)
    out_bytes = in_bytes // k
    work = Path(tempfile.mkdtemp(prefix="ckptavg-bench-", dir=args.data))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ckptavg = [sys.executable, "-m", "ckptavg", "average", *map(str, folders), "--out", str(work / "avg"),
               "--force", "-q", "--device", args.device]
    warm = in_bytes < mem_total() // 2
    modes = (["warm"] if warm else []) + (["cold"] if args.cold and os.geteuid() == 0 else [])

    def record(key: str, value: float) -> None:
        rows.setdefault(f"{case} {key}", []).append(value)

    def commands(label: str, cmd_env: dict, mode: str, rep: int, floor: float, hash_floor: float,
                 prep: Callable[[], object]) -> tuple[float, float, float]:
        """One checkout's command without and with hashing: their wall times and the engine's seconds."""
        prep()
        plain, peak = run_measured(ckptavg + ["--no-hash"], cmd_env)
        engine = json.loads((work / "avg" / "ckptavg.json").read_text())["seconds"]
        record(f"{mode} {label}/floor", plain / floor)
        record(f"{mode} {label} engine/floor", engine / floor)
        record(f"{mode} {label} peak RssAnon MB", peak / 1e6)
        prep()
        cache = str(work / f"hash-cache-{label}-{rep}-{mode}")
        hashed, peak = run_measured(ckptavg, dict(cmd_env, CKPTAVG_CACHE=cache))
        record(f"{mode} {label}+hash/floor", hashed / floor)
        record(f"{mode} {label}+hash/floor+hash", hashed / hash_floor)
        record(f"{mode} {label}+hash/{label}", hashed / plain)
        record(f"{mode} {label}+hash peak RssAnon MB", peak / 1e6)
        return plain, hashed, engine

    kind = f"float32 DCP, {DCP_RANKS}-rank row-sharded" if case.endswith("-dcp") else "float16"
    print(f"\n{case}: {k} x {out_bytes / 1e9:.2f} GB {kind} ({shape.name} shapes), {in_bytes / 1e9:.1f} GB in all; "
          f"{os.cpu_count()} cores, arithmetic on {args.device}"
          + ("" if warm else "; no warm runs: the inputs do not fit in half the memory"),
          flush=True)
    try:
        for rep in range(args.reps):
            for mode in modes:
                prep = drop_caches if mode == "cold" else (lambda: floor_read(files))
                prep()
                floor = floor_read(files) + floor_write(work / "floor.bin", out_bytes)
                record(f"{mode} floor s", floor)
                prep()
                hash_floor = floor_hashed(files, work / "floor.bin", out_bytes)
                record(f"{mode} floor+hash s", hash_floor)
                # the two checkouts take turns at going first: cold, with ckptavg always first, its unhashed
                # command (the same code in both checkouts) took 1.03-1.20x as long as the baseline's
                checkouts = [("ckptavg", env)] + ([("baseline", dict(env, PYTHONPATH=str(args.baseline.resolve())))]
                                                  if args.baseline else [])
                timed = {label: commands(label, cmd_env, mode, rep, floor, hash_floor, prep)
                         for label, cmd_env in (checkouts if rep % 2 == 0 else checkouts[::-1])}
                plain, hashed, engine = timed["ckptavg"]
                print(f"rep {rep + 1} {mode}: floor {floor:.2f} s, floor+hash {hash_floor:.2f} s, "
                      f"ckptavg {plain:.2f} s (engine {engine:.2f} s), +hash {hashed:.2f} s", flush=True)
                if args.baseline:
                    base_plain, base_hashed, _ = timed["baseline"]
                    record(f"{mode} ckptavg/baseline", plain / base_plain)
                    record(f"{mode} ckptavg+hash/baseline+hash", hashed / base_hashed)
                    print(f"rep {rep + 1} {mode} baseline: {base_plain:.2f} s, +hash {base_hashed:.2f} s", flush=True)
                for n in args.ranks:
                    prep()
                    t, peak = run_ranks_measured(ckptavg + ["--no-hash"], n, env)
                    record(f"{mode} ranks={n}/floor", t / floor)
                    record(f"{mode} ranks={n}/ckptavg", t / plain)
                    record(f"{mode} ranks={n} peak RssAnon MB a rank", peak / 1e6)
                    prep()
                    hashed_t, _ = run_ranks_measured(ckptavg, n, dict(env, CKPTAVG_CACHE=str(
                        work / f"hash-cache-ranks{n}-{rep}-{mode}")))
                    record(f"{mode} ranks={n}+hash/ranks={n}", hashed_t / t)
                    print(f"rep {rep + 1} {mode} {n} ranks: {t:.2f} s, +hash {hashed_t:.2f} s, peak RssAnon "
                          f"{peak / 1e9:.2f} GB a rank", flush=True)
                if args.mergekit and not case.endswith("-dcp"):
                    prep()
                    cfg = mergekit_config(folders, work / "mergekit.yml")
                    t, peak = run_measured([args.mergekit, str(cfg), str(work / "mergekit-out"), "--quiet",
                                            "--no-copy-tokenizer", "--no-write-model-card", "--lazy-unpickle"], env)
                    shutil.rmtree(work / "mergekit-out", ignore_errors=True)
                    record(f"{mode} mergekit/floor", t / floor)
                    record(f"{mode} mergekit peak RssAnon MB", peak / 1e6)
                    record(f"{mode} mergekit/ckptavg", t / plain)
                    record(f"{mode} mergekit/ckptavg+hash", t / hashed)
                    print(f"rep {rep + 1} {mode} mergekit: {t:.2f} s, peak RssAnon {peak / 1e9:.2f} GB", flush=True)
                if rep < args.naive_reps and mode == "warm" and not case.endswith("-dcp"):
                    t, peak = run_measured([sys.executable, "-c", NAIVE, *map(str, files),
                                            str(work / "naive.safetensors")], env)
                    record("warm naive/floor", t / floor)
                    record("warm naive peak RssAnon MB", peak / 1e6)
                    print(f"rep {rep + 1} naive: {t:.2f} s, peak RssAnon {peak / 1e9:.2f} GB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive-reps", type=int, default=1)
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu", help="ckptavg's --device (cuda: arithmetic on the GPU)")
    ap.add_argument("--baseline", type=Path, help="another ckptavg checkout (its root folder) to time beside "
                    "this one in every repetition: ratios of this one's time to its")
    ap.add_argument("--mergekit", help="path of a `mergekit-yaml` executable: also time mergekit's linear merge "
                    "of the same inputs (pip install mergekit, ideally in its own venv)")
    ap.add_argument("--ranks", default="", help="comma-separated rank counts (2,3): also time the command "
                    "launched as that many ranks sharing one average")
    args = ap.parse_args()
    args.ranks = [int(n) for n in args.ranks.split(",") if n]
    args.data = args.data.resolve()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    rows: dict[str, list[float]] = {}
    for case in cases:
        bench_case(case, args, rows)
    # a user gets the median run, not the best: the spread is part of the result
    print(f"\n{'measure':40} {'min':>9} {'median':>9} {'max':>9}  (n)")
    for key, values in rows.items():
        print(f"{key:40} {min(values):9.2f} {statistics.median(values):9.2f} {max(values):9.2f}  ({len(values)})")


if __name__ == "__main__":
    main()
