"""Tiny Pythia-architecture checkpoints, built once per session, in every on-disk layout ckptavg reads."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ckptavg.storage import pagecache  # noqa: E402

LAYERS = 2
CTX = 64


def tiny_config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=CTX, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False)


def pythia_state_dict(seed: int, dtype: torch.dtype, buffers: bool = True) -> dict[str, torch.Tensor]:
    """A GPT-NeoX state dict named and laid out like EleutherAI's Pythia `.bin` files."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(tiny_config())
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v.detach().to(dtype).contiguous()
          for k, v in model.state_dict().items()}
    if buffers:
        for i in range(LAYERS):
            p = f"gpt_neox.layers.{i}.attention."
            sd[p + "bias"] = torch.tril(torch.ones(1, 1, CTX, CTX, dtype=torch.bool)).view(1, 1, CTX, CTX)
            sd[p + "masked_bias"] = torch.tensor(-1e9)
            sd[p + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 2, 2).float() / 2)) * (1 + seed)
        sd["gpt_neox.step_counter"] = torch.tensor([seed], dtype=torch.int64)
    return sd


def _split(sd: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    keys = list(sd)
    half = len(keys) // 2
    return [{k: sd[k] for k in keys[:half]}, {k: sd[k] for k in keys[half:]}]


def write_checkpoint(folder: Path, sd: dict[str, torch.Tensor], fmt: str) -> Path:
    """fmt: safetensors | safetensors-sharded | bin | bin-sharded."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_config().save_pretrained(folder)
    if fmt == "safetensors":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif fmt in ("safetensors-sharded", "bin-sharded"):
        parts = _split(sd)
        weight_map = {}
        for i, part in enumerate(parts):
            if fmt == "safetensors-sharded":
                name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, folder / name, metadata={"format": "pt"})
            else:
                name = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
                torch.save(part, folder / name)
            weight_map.update({k: name for k in part})
        index = "model.safetensors.index.json" if fmt.startswith("safetensors") else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    return folder


def load_reference(folder: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint the plain way: the independent side of every comparison. A DCP
    folder is read whole by torch's own converter (`dcp_to_torch_save`)."""
    out: dict[str, torch.Tensor] = {}
    for trainer_folder in ("model_and_optim", "pytorch_model_fsdp_0"):  # a step as OLMo-core, accelerate lay it out
        if (folder / trainer_folder / ".metadata").is_file():
            folder = folder / trainer_folder
    if (folder / ".metadata").is_file():
        import tempfile
        import warnings

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp_to_torch_save(folder, Path(tmp) / "all.pt")
            return torch.load(Path(tmp) / "all.pt", weights_only=True)
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            out.update(load_file(f))
        elif f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
    return out


def reference_average(folders, weights=None, out_dtype=None, copy=()):
    """Load everything, sum in float64 in input order (the plain mean, sum / n, when no weights are
    given), cast once; copy non-float and buffer tensors (and names ending in one of `copy`) from
    the newest input, which alone decides which of them the output holds.

    Returns (reference, scale): scale[name] = sum_i |w_i x_i| in float64, the magnitude that bounds
    the rounding error of any accumulation order (needed where the inputs cancel to about zero).
    """
    sds = [load_reference(f) for f in folders]
    mean = weights is None  # a plain mean: sum, then divide by n
    weights = weights or [1.0 / len(sds)] * len(sds)
    newest = sds[-1]
    ref, scale = {}, {}
    for name, t in newest.items():
        buffer = name.endswith(("attention.bias", "masked_bias", "inv_freq", *copy))
        if not t.is_floating_point() or buffer:
            ref[name] = t.clone()
            continue
        acc = sds[0][name].double() * (1.0 if mean else weights[0])
        mag = acc.abs()
        for sd, w in zip(sds[1:], weights[1:], strict=True):
            term = sd[name].double() * (1.0 if mean else w)
            acc = acc + term
            mag = mag + term.abs()
        if mean:
            acc, mag = acc / len(sds), mag / len(sds)
        ref[name] = acc.to(out_dtype or t.dtype)
        scale[name] = mag
    return ref, scale


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values apart two same-dtype float tensors are, element-wise."""
    assert a.dtype == b.dtype
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[a.dtype]
    lowest = torch.iinfo(ints).min

    def ordered(x):
        i = x.contiguous().view(ints).long()
        return torch.where(i < 0, lowest - i, i)

    return (ordered(a) - ordered(b)).abs()


def cli(*args):
    """`ckptavg ARGS` in this process (typer's runner), every argument as a string."""
    from typer.testing import CliRunner

    from ckptavg.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def hub_cli(hub, home: Path, *args: str, offline: bool = False, endpoint: str | None = None,
            wait: bool = True, env: dict | None = None):
    """`ckptavg ARGS` in a process of its own, against the test Hub `hub` (huggingface_hub reads HF_ENDPOINT
    and HF_HUB_OFFLINE when it is imported), with every cache under `home`; `env` adds variables."""
    env = dict(os.environ, HF_ENDPOINT=endpoint or hub.url, HF_HUB_OFFLINE="1" if offline else "0",
               HF_HOME=str(home / "hf"), CKPTAVG_CACHE=str(home / "ckptavg-cache"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    cmd = [sys.executable, "-m", "ckptavg", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def assert_matches(out, reference, max_ulp: int, accumulate=torch.float32):
    """Every float of `out` (an output folder, or a state dict made in memory) within `max_ulp` of the
    float64 reference; where inputs cancel to about zero, within the accumulation dtype's rounding
    error of sum |w_i x_i| instead (0 slack for float64)."""
    ref, scale = reference
    got = out if isinstance(out, dict) else load_reference(out)
    assert set(got) == set(ref)
    slack = 0.0 if accumulate == torch.float64 else 4 * torch.finfo(accumulate).eps
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if name in scale:
            far = ulp_distance(g, r) > max_ulp
            cancelled = (g.double() - r.double()).abs() <= slack * scale[name]
            assert not (far & ~cancelled).any(), name
        else:
            assert torch.equal(g, r), name


def assert_user_error(result, *fragments, out=None):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def recursive_ema(folders, alpha):
    sds = [load_reference(f) for f in folders]
    out = {}
    for name, t in sds[-1].items():
        if not t.is_floating_point() or name.endswith(("attention.bias", "masked_bias", "inv_freq")):
            continue
        e = sds[0][name].double()
        for sd in sds[1:]:
            e = (1 - alpha) * e + alpha * sd[name].double()
        out[name] = e.to(t.dtype)
    return out


def assert_loads_in_transformers(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    written = load_reference(folder)
    assert torch.equal(model.lm_head.weight.detach(), written["embed_out.weight"])
    assert torch.isfinite(model(torch.arange(8).unsqueeze(0)).logits).all()


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict:
    """Three-checkpoint trajectories: {(dtype_name, fmt): [folder, ...]} built on first use."""
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict = {}

    def get(dtype: str = "float16", fmt: str = "safetensors", n: int = 3) -> list[Path]:
        key = (dtype, fmt, n)
        if key not in cache:
            cache[key] = [write_checkpoint(root / f"{dtype}-{fmt}-{n}" / f"step{i}",
                                           pythia_state_dict(seed=i, dtype=getattr(torch, dtype)), fmt)
                          for i in range(n)]
        return cache[key]

    return get


def char_tokenizer():
    """A character-level tokenizer small enough for `tiny_config`'s 128-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>")


def o_direct_set(fd: int) -> bool:
    """Whether a file descriptor is open for direct I/O, as the kernel reports it."""
    flags = next(line for line in open(f"/proc/self/fdinfo/{fd}") if line.startswith("flags:"))
    return bool(int(flags.split()[1], 8) & os.O_DIRECT)


def refuse_direct_io(monkeypatch, call: str) -> list[int]:
    """Make `os.<call>` ("open", or a read or write call taking a file descriptor first) answer EINVAL where
    it would open or use a file with O_DIRECT, as tmpfs before Linux 6.6, some network filesystems and
    devices that want another alignment answer. Returns the descriptors refused (empty for "open")."""
    real, refused = getattr(os, call), []

    def refusing(*args, **kw):
        if (args[1] & os.O_DIRECT) if call == "open" else o_direct_set(args[0]):
            refused.append(args[0])
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(*args, **kw)

    monkeypatch.setattr(os, call, refusing)
    return refused


_EVICTS: dict[int, bool] = {}  # by filesystem (st_dev)


def _fadvise_evicts(folder: Path) -> bool:
    """Whether posix_fadvise(DONTNEED) takes a file on this filesystem out of the page cache, tried on a
    probe file of its own (tmpfs has nowhere else to keep the pages, so it keeps them)."""
    dev = folder.stat().st_dev
    if dev not in _EVICTS:
        probe = folder / ".evict-probe"
        probe.write_bytes(os.urandom(1 << 16))
        fd = os.open(probe, os.O_RDONLY)
        try:
            os.fsync(fd)
            for _ in range(5):  # pages still in a CPU's LRU batch are left until it is drained
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                if pagecache.cached_share(fd, 0, 1) < 1:
                    break
                time.sleep(0.01)
            _EVICTS[dev] = pagecache.cached_share(fd, 0, 1) < 1
        finally:
            os.close(fd)
            probe.unlink()
    return _EVICTS[dev]


def cached_share_of(path, pos: int, nbytes: int) -> float:
    """The share of `nbytes` of `path` from `pos` in the page cache (mincore: reads nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.cached_share(fd, pos, nbytes)
    finally:
        os.close(fd)


def evict(path, pos: int = 0, nbytes: int = 0) -> None:
    """Out of the page cache, as after a reboot (pages still mapped stay): the whole file, or `nbytes` of it
    from `pos`. Where the filesystem keeps the pages anyway, the test that asked is skipped: it needs a disk."""
    if not _fadvise_evicts(Path(path).parent):
        pytest.skip(f"posix_fadvise(DONTNEED) leaves files cached on {Path(path).parent}'s filesystem (tmpfs?)")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        span = nbytes or os.fstat(fd).st_size - pos
        for _ in range(5):  # pages still in a CPU's LRU batch (a read just now) are left until it is drained
            os.posix_fadvise(fd, pos, nbytes, os.POSIX_FADV_DONTNEED)
            if pagecache.cached_share(fd, pos, span) == 0:
                break
            time.sleep(0.01)
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def slurm():
    """Debian's slurmctld, slurmd, munge, slurmdbd and MariaDB, started here; skipped, with the reason, where
    they cannot be."""
    import tempfile

    from slurmcluster import Cluster, Unavailable

    base = Path(tempfile.mkdtemp(prefix="ckptavg-slurm-"))  # pytest's folders are 0700: munged could not enter
    base.chmod(0o755)
    cluster = Cluster(base)
    try:
        cluster.start()
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"no Slurm on this machine: {e}")
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)
