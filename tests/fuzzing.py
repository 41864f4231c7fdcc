"""Mutated checkpoints of every format, and what ckptavg must do with each (issue 40): refuse it with a
`CkptavgError`, or average it to exactly the float64 mean of what torch's own loaders give; and never read
a file outside the checkpoint, change a torch class, run planted code or exhaust memory.

    python tests/fuzzing.py --cases 200 --seed 0        # what tests/test_fuzz.py runs, per format
    python bench/fuzz.py --cases 5000                    # a longer run, before a release

Run as a process of its own, under an address-space limit (`--memory-gib`), with an audit hook that records
every file opened. Prints one JSON line per format: cases, how many were refused and accepted, and the
failures (a traceback, a wrong average, a file outside opened, a class changed, planted code run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import traceback
import warnings
import zipfile
from pathlib import Path

FORMATS = ("safetensors", "sharded", "bin", "lightning", "dcp")
PLANTED = "PWNED"
MINIZ = (" This is an internal miniz error. If you are seeing this error, there is a high likelihood that your "
         "checkpoint file is corrupted. This can happen if the checkpoint was not saved properly, was transferred "
         "incorrectly, or the file was modified after saving.")  # the file planted code would make in the case's folder

# -- the corpus: real checkpoints, as the real writers save them --


def _state_dict(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(6, 4, generator=g).half(), "layer.0.weight": torch.randn(4, 4, generator=g),
            "layer.0.bias": torch.randn(4, generator=g).bfloat16(), "steps": torch.tensor([seed], dtype=torch.int64)}


def write_corpus(fmt: str, folder: Path, seed: int) -> Path:
    """One checkpoint of `fmt` in `folder`, as safetensors, torch.save and DCP write it."""
    import torch
    from safetensors.torch import save_file

    sd = _state_dict(seed)
    folder.mkdir(parents=True)
    if fmt == "safetensors":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text('{"model_type": "tiny"}')
    elif fmt == "sharded":
        names = sorted(sd)
        weight_map = {}
        for i, part in enumerate((names[:2], names[2:])):
            shard = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({n: sd[n] for n in part}, folder / shard)
            weight_map.update({n: shard for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif fmt == "lightning":
        torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.6", "global_step": seed, "epoch": 0,
                    "hyper_parameters": {"lr": 0.1, "layers": [4, 4]}, "optimizer_states": []},
                   folder / "epoch=0-step=2.ckpt")
    elif fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({**sd, "optim.state.layer.0.weight.exp_avg": torch.zeros(4, 4), "train_state": {"step": seed}},
                     checkpoint_id=str(folder), no_dist=True)
        import pickle

        metadata = pickle.loads((folder / ".metadata").read_bytes())  # (this corpus's own file)
        metadata.storage_meta = None  # (its save id is random: without it, a seed gives the same cases every run)
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    else:
        raise ValueError(fmt)
    return folder


def checkpoint_path(fmt: str, folder: Path) -> Path:
    """What a user names as the checkpoint: the folder, or Lightning's file."""
    return folder / "epoch=0-step=2.ckpt" if fmt == "lightning" else folder


# -- what torch's own loaders give --


def torch_loads(fmt: str, folder: Path) -> dict:
    """The model's tensors as the format's own loader gives them (safetensors; torch.load with weights_only;
    DCP's load into tensors of the sizes its metadata gives)."""
    import torch

    if fmt in ("safetensors", "sharded"):
        from safetensors.torch import load_file

        index = folder / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in load_file(folder / s).items()}
        return load_file(folder / "model.safetensors")
    if fmt in ("bin", "lightning"):
        file = folder / ("pytorch_model.bin" if fmt == "bin" else "epoch=0-step=2.ckpt")
        obj = torch.load(file, weights_only=True, map_location="cpu")
        sd = obj["state_dict"] if fmt == "lightning" else obj
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}  # (the rest is never averaged)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and not k.startswith("optim.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


# -- mutations --

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1)


def _bytes_mutation(rng: random.Random, data: bytes) -> bytes:
    """A byte flip, a truncation, an insertion or deletion, or an interesting integer written somewhere,
    mostly near the start and end of the file, where headers and zip directories are."""
    if not data:
        return bytes([rng.randrange(256)])
    n = len(data)
    pos = rng.choice((rng.randrange(min(n, 4096)), n - 1 - rng.randrange(min(n, 4096)), rng.randrange(n)))
    kind = rng.randrange(5)
    if kind == 0:
        return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:]
    if kind == 1:
        return data[:pos]
    if kind == 2:
        return data[:pos] + rng.randbytes(rng.randrange(1, 16)) + data[pos:]
    if kind == 3:
        return data[:pos] + data[pos + rng.randrange(1, 16):]
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice(INTERESTING) & ((1 << 8 * width) - 1)
    return data[:pos] + value.to_bytes(width, "little") + data[pos + width:]


def _json_value(rng: random.Random):
    return rng.choice((-1, 0, 2**40, 2**70, 1.5, 1e308, "3", None, [1], {"a": 1}, True, "F32", "BF16", "../x",
                       "/etc/passwd", "model-00001-of-00002.safetensors"))


def _json_mutation(rng: random.Random, header: dict) -> dict:
    """One value of a JSON object (a safetensors header, an index) replaced, removed, or added, at any depth."""
    paths = []
    todo = [((), header)]
    while todo:
        path, value = todo.pop()
        paths.append(path)
        if isinstance(value, dict):
            todo.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend(((*path, i), v) for i, v in enumerate(value))
    path = rng.choice(paths[1:] or paths)
    if not path:
        return header
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    choice = rng.randrange(4)
    if choice == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    elif choice == 1 and isinstance(parent, list):
        parent.append(_json_value(rng))
    elif choice == 2 and isinstance(parent, dict):
        parent[str(_json_value(rng))] = _json_value(rng)
    else:
        parent[path[-1]] = _json_value(rng)
    return header


def _safetensors_mutation(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = _json_mutation(rng, json.loads(data[8:8 + n]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    size = len(raw) if rng.random() < 0.9 else rng.choice((0, len(raw) - 1, len(raw) + 8, 2**63))
    return struct.pack("<Q", size % 2**64) + raw + data[8 + n:]


# snippets put between a pickle's opcodes: each a complete push of one value (or none), so that the pickle
# still parses where the place allows it, and the value lands in a container, an argument or a memo
_PAYLOAD = f"touch {PLANTED}".encode()
SNIPPETS = (
    b"cposix\nsystem\nX" + struct.pack("<I", len(_PAYLOAD)) + _PAYLOAD + b"\x85R",  # os.system("touch PWNED")
    b"cbuiltins\nexec\nX\x1a\x00\x00\x00open('PWNED','w').write('')\x85R",
    b"ctorch\nHalfStorage\nN}X\x05\x00\x00\x00dtypectorch\nbfloat16\ns\x86b",  # BUILD on a class
    b"ctorch.distributed.checkpoint.metadata\nChunkStorageMetadata\nN}X\x0c\x00\x00\x00__getstate__Ns\x86b",
    b"Nr\xff\xff\xff\xff",  # a memo index of 2**32 - 1
    b"cbuiltins\nbytearray\n\x8a\x05\x00\x5e\xd0\xb2\x00\x85R",  # bytearray(3e9)
    b"ctorch\nFloatStorage\nJ\x00\x94\x35\x77\x85R",  # torch.FloatStorage(2e9)
    b")" + b"\x85" * 5000,  # tuples nested 5,000 deep
    b"]" + b"]a" * 5000,  # lists nested 5,000 deep
    b"\x82\x01",  # EXT1
    b"h\x00", b"j\xff\xff\x00\x00", b"2", b"0", b"(", b"t", b"R", b"b", b"s", b"u", b"e", b"a", b"\x81",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n)R", b"ctorch\nSize\n)R",
    b"K\xff", b"J\xff\xff\xff\xff", b"\x8a\x08" + b"\xff" * 8, b"G\x7f\xf0\x00\x00\x00\x00\x00\x00",
)


def _pickle_mutation(rng: random.Random, data: bytes) -> bytes:
    """An opcode's argument changed, an opcode dropped or repeated, or a snippet inserted between two."""
    import pickletools

    try:
        ops = [(pos, op) for op, _, pos in pickletools.genops(data)]
    except Exception:  # (a pickle that an earlier mutation already broke)
        return _bytes_mutation(rng, data)
    starts = [p for p, _ in ops] + [len(data)]
    i = rng.randrange(len(ops))
    pos, op = ops[i]
    end = starts[i + 1]
    kind = rng.randrange(4)
    if kind == 0:
        return data[:pos] + rng.choice(SNIPPETS) + data[pos:]
    if kind == 1:
        return data[:pos] + data[end:]
    if kind == 2:
        return data[:pos] + data[pos:end] * 2 + data[end:]
    if end - pos > 1:  # an argument: an interesting integer over its first bytes
        width = min(end - pos - 1, rng.choice((1, 4, 8)))
        value = rng.choice(INTERESTING) & ((1 << 8 * width) - 1)
        return data[:pos + 1] + value.to_bytes(width, "little") + data[pos + 1 + width:]
    return data[:pos] + bytes([rng.randrange(256)]) + data[end:]


def _zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _rezip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info, data in members:
            z.writestr(zipfile.ZipInfo(info.filename), data, info.compress_type)
    return out.getvalue()


def _archive_mutation(rng: random.Random, data: bytes) -> bytes:
    """A torch.save archive (or a DCP record): its pickle mutated, a member renamed, doubled, dropped or
    compressed, or a field of its zip directory changed."""
    try:
        members = _zip_members(data)
    except Exception:
        return _bytes_mutation(rng, data)
    kind = rng.randrange(6)
    if kind <= 1:
        members = [(i, _pickle_mutation(rng, d) if i.filename.endswith("data.pkl") else d) for i, d in members]
        return _rezip(members)
    i = rng.randrange(len(members))
    if kind == 2:
        members.insert(i, members[rng.randrange(len(members))])
    elif kind == 3:
        del members[i]
    elif kind == 4:
        info = members[i][0]
        info.compress_type = rng.choice((zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_STORED))
        if rng.random() < 0.3:
            info.filename = rng.choice(("archive/data/0", "other/data.pkl", "archive/byteorder", "archive/data.pkl"))
    else:  # a field of the central directory or of a local header
        out = bytearray(_rezip(members))
        sig = rng.choice((b"PK\x01\x02", b"PK\x03\x04", b"PK\x05\x06"))
        hits = [j for j in range(len(out)) if out.startswith(sig, j)]
        if hits:
            at = rng.choice(hits) + rng.randrange(4, 30)
            width = rng.choice((2, 4))
            out[at:at + width] = (rng.choice(INTERESTING) & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        return bytes(out[:len(out)])
    return _rezip(members)


def mutate(fmt: str, folder: Path, rng: random.Random) -> str:
    """Mutate one file of the checkpoint in `folder` (in place); what was done, for the report."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if fmt == "dcp" and rng.random() < 0.1:  # an entry whose file is outside, through the metadata
        return _dcp_outside(folder, rng)
    if rng.random() < 0.05:  # a side file or a weight file replaced by a link out of the checkpoint
        target = rng.choice([p for p in files if p.suffix != ".metadata"] or files)
        outside = folder.parent / "outside.bin"
        shutil.copy(target, outside)
        target.unlink()
        os.symlink(outside, target)
        return f"{target.name}: a link to a file outside"
    f = rng.choice(files)
    data = f.read_bytes()
    if f.suffix == ".safetensors" and rng.random() < 0.7:
        how, new = "header", _safetensors_mutation(rng, data)
    elif f.name.endswith(".json") and rng.random() < 0.7:
        how, new = "json", (json.dumps(_json_mutation(rng, json.loads(data))).encode())
    elif f.name == ".metadata" and rng.random() < 0.7:
        how, new = "pickle", _pickle_mutation(rng, data)
    elif f.suffix in (".bin", ".ckpt") and rng.random() < 0.8:
        how, new = "archive", _archive_mutation(rng, data)
    else:
        how, new = "bytes", _bytes_mutation(rng, data)
    f.write_bytes(new)
    return f"{f.name}: {how}"


def _dcp_outside(folder: Path, rng: random.Random) -> str:
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = pickle.loads((folder / ".metadata").read_bytes())  # (the corpus's own file)
    path = rng.choice(("/etc/passwd", "../outside.bin", "a/../../outside.bin", "/proc/self/environ"))
    if rng.random() < 0.5:
        metadata.state_dict_metadata["model.extra_state"] = BytesStorageMetadata()
        metadata.storage_data[MetadataIndex("model.extra_state")] = _StorageInfo(path, 0, 16)
    else:
        key = rng.choice([k for k in metadata.storage_data if k.offset is not None])
        info = metadata.storage_data[key]
        metadata.storage_data[key] = _StorageInfo(path, info.offset, info.length)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return f".metadata: an entry in {path}"


# -- what each case must come to --


def torch_state() -> dict:
    """Every attribute of torch's storage types, tensor type and DCP metadata classes, as text, and which
    object each attribute of those modules (and `torch._utils`, `collections`) is."""
    import collections

    import torch
    import torch._utils
    from torch.distributed.checkpoint import filesystem, metadata

    found = {}
    for owner in (torch, metadata, filesystem):
        for name in dir(owner):
            value = getattr(owner, name, None)
            if isinstance(value, type) and (owner is not torch or name.endswith("Storage") or name == "Tensor"):
                found[f"{owner.__name__}.{name}"] = {k: repr(v) for k, v in vars(value).items()}
    modules = {m.__name__: {k: id(v) for k, v in vars(m).items()}
               for m in (torch, torch._utils, metadata, filesystem, collections)}
    return {"classes": found, "modules": modules}


def changed(before: dict, after: dict) -> list[str]:
    """What differs: any attribute of a class, added, removed or changed; an attribute a module had, now
    another object or gone (a module may gain attributes, as torch imports its parts lazily)."""
    classes = [f"{c}.{k}" for c in set(before["classes"]) | set(after["classes"])
               for k in set(before["classes"].get(c, {})) | set(after["classes"].get(c, {}))
               if before["classes"].get(c, {}).get(k) != after["classes"].get(c, {}).get(k)]
    modules = [f"{m}.{k}" for m, attrs in before["modules"].items() for k, v in attrs.items()
               if after["modules"][m].get(k) != v]
    return classes + modules


class Opened:
    """Every file opened (an audit hook: `open` events), for a case to check that it read nothing outside."""

    def __init__(self) -> None:
        self.paths: list[str] | None = None
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if event == "open" and self.paths is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))


def _outside(paths: list[str], allowed: list[Path]) -> list[str]:
    roots = [str(a.resolve()) for a in allowed]
    return [p for p in paths if not p.startswith(("/proc/", "/sys/", "/dev/", sys.prefix, sys.base_prefix))
            and not any(os.path.realpath(p).startswith(r) for r in roots) and not p.endswith((".py", ".pyc", ".so"))]


def run_case(fmt: str, corpus: Path, base: Path, case: int, rng: random.Random, opened: Opened) -> dict:
    """One mutated checkpoint averaged with a clean one (the mutated one newest: its side files and copied
    tensors are the output's). A failure is a dict saying what went wrong; None otherwise."""

    from ckptavg.engine.average import average_checkpoints
    from ckptavg.errors import CkptavgError

    work = base / f"case{case}"
    work.mkdir()
    clean, bad = shutil.copytree(corpus / "1", work / "clean"), shutil.copytree(corpus / "2", work / "ckpt")
    how = mutate(fmt, bad, rng)
    out = work / "out"
    before = torch_state()
    opened.paths = []
    result = {"case": case, "mutation": how}
    try:
        average_checkpoints([checkpoint_path(fmt, clean), checkpoint_path(fmt, bad)], out, hash_inputs=False,
                            output_format="safetensors")
        result["outcome"] = "accepted"
    except CkptavgError as e:
        result["outcome"] = "refused"
        result["error"] = str(e)[:300]
        if "\n" in str(e):
            result["failure"] = "an error message of several lines"
    except Exception:
        result["outcome"] = "failed"
        result["failure"] = traceback.format_exc(limit=-4)[-1500:]
    finally:
        paths, opened.paths = opened.paths, None
    if (work / PLANTED).exists() or Path(PLANTED).exists():
        result["failure"] = "planted code ran"
    outside = _outside(paths, [work])
    if outside:
        result["failure"] = f"opened outside the checkpoints: {outside[:3]}"
    moved = changed(before, torch_state())
    if moved:
        result["failure"] = f"torch changed: {moved[:3]}"
    if result["outcome"] == "accepted":
        from safetensors.torch import load_file

        got = load_file(out / "model.safetensors")
        try:
            problem = _compare(got, [torch_loads(fmt, clean), torch_loads(fmt, bad)])
        except BaseException as e:  # (DCP's CheckpointException is not an Exception)
            if isinstance(e, KeyboardInterrupt):
                raise
            # torch refuses the file: ckptavg may still average it where what it refused lies beside the model (a
            # trainer's object, read as an inert record), and then the model is the unmutated file's
            refused = f"{type(e).__name__}: {str(e)[-300:].replace(MINIZ, '')}"
            result["outcome"], result["torch"] = "beside the model", refused
            if _compare(got, [torch_loads(fmt, clean), torch_loads(fmt, corpus / "2")]) is not None:
                problem = f"ckptavg averaged what torch's loader refuses ({refused})"
            else:
                problem = None
        if problem:
            result["failure"] = problem
    keep = os.environ.get("CKPTAVG_FUZZ_KEEP")  # a folder to keep each failing case's checkpoints in
    if keep and ("failure" in result or result["outcome"] == "beside the model"):
        shutil.copytree(work, Path(keep) / f"{fmt}-{case}", symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _compare(got: dict, loads: list[dict]) -> str | None:
    """What differs between ckptavg's average and the float64 mean of torch's loads (None: nothing)."""
    import torch

    newest = loads[-1]
    if set(got) != set(newest):
        return f"names {sorted(set(got) ^ set(newest))[:3]} differ from torch's"
    for name, t in newest.items():
        g = got[name]
        if g.dtype != t.dtype or g.shape != t.shape:
            return f"{name}: {g.dtype} {list(g.shape)} where torch gives {t.dtype} {list(t.shape)}"
        want = t
        if t.is_floating_point() and all(name in sd for sd in loads):
            want = (sum(sd[name].double() for sd in loads) / len(loads)).to(t.dtype)
        try:
            torch.testing.assert_close(g, want, rtol=0, atol=0, equal_nan=True)
        except AssertionError:
            return f"{name}: not the float64 mean of what torch loads"
    return None


def fuzz(fmt: str, cases: int, seed: int, opened: Opened) -> dict:
    rng = random.Random(f"{fmt}-{seed}")
    counts = {"refused": 0, "accepted": 0, "beside the model": 0, "failed": 0}
    failures, beside = [], []
    with tempfile.TemporaryDirectory(prefix=f"ckptavg-fuzz-{fmt}-") as tmp:
        corpus = Path(tmp) / "corpus"
        for seed_ in (1, 2):
            write_corpus(fmt, corpus / str(seed_), seed_)
        cwd = os.getcwd()
        os.chdir(tmp)  # (planted code that writes relative to the working folder writes here)
        try:
            for case in range(cases):
                r = run_case(fmt, corpus, Path(tmp), case, rng, opened)
                counts[r["outcome"]] += 1
                if "failure" in r:
                    failures.append(r)
                elif r["outcome"] == "beside the model":
                    beside.append(r)
        finally:
            os.chdir(cwd)
    return {"format": fmt, "cases": cases, "seed": seed, **counts, "failures": failures,
            "torch refused": [f"{r['mutation']}: {r['torch']}" for r in beside]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="cases per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--memory-gib", type=float, default=6.0, help="the address-space limit of this process")
    args = parser.parse_args(argv)
    import resource

    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ["CKPTAVG_NO_PROGRESS"] = "1"
    warnings.simplefilter("ignore")
    opened = Opened()
    failed = False
    for fmt in args.formats.split(","):
        report = fuzz(fmt, args.cases, args.seed, opened)
        failed |= bool(report["failures"])
        print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (this checkout's ckptavg, not an installed one)
    sys.exit(main())
