"""One checkpoint, whatever wrote it, indexed without reading tensor data: the one detector that names its
format (how its bytes are encoded) and trainer (whose layout it is), and the typed index every format
turns into.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CorruptCheckpointError, InputError, with_path
from ..storage.paths import location
from . import dcp, torchsave
from .confine import inside
from .formats import FORMATS, of_file
from .index import Checkpoint, TensorRef
from .layouts import checkpoint_in
from .names import DCP_SUBFOLDER_OF, DEEPSPEED_MODEL, WEIGHT_LAYOUTS, weight_layout
from .safetensors_header import strict_json


def _dcp_trainer(folder: Path) -> str:
    """Whose DCP folder this is, by the files each trainer saves beside (or around) it."""
    try:
        megatron = strict_json((folder / "metadata.json").read_bytes(), "")
        if isinstance(megatron, dict) and megatron.get("sharded_backend") == "torch_dist":
            return "megatron"
    except (OSError, CorruptCheckpointError):
        pass
    if (folder / "meta.pt").is_file():
        return "lightning"
    return next((t for t, sub in DCP_SUBFOLDER_OF.items() if sub == folder.name), "dcp")


def _folder_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, weight files, the index's weight map) of a model folder."""
    found = weight_layout(e.name for e in path.iterdir())
    if found is not None and not (path / found[0]).is_file():  # (one stat, not one for each entry listed)
        raise CorruptCheckpointError(f"{path / found[0]}: not a file")
    if found is None:
        if any(path.glob("zero_pp_rank_*_model_states.pt")):
            raise torchsave.zero3_refused(path)
        wanted = ", ".join(n for n, _ in WEIGHT_LAYOUTS)
        raise InputError(f"{path}: no weights found (looked for {wanted}, and a DCP .metadata)")
    name, fmt = found
    if name == DEEPSPEED_MODEL and any(path.glob("mp_rank_0[1-9]_model_states.pt")):
        raise InputError(f"{path}: a DeepSpeed checkpoint of several model-parallel ranks: ckptavg reads one")
    if not name.endswith(".index.json"):
        return fmt, [inside(path, name, str(path))], None
    index = inside(path, name, str(path))
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise with_path(e, index) from None
    weight_map = strict_json(raw, f"{index}: not a valid weight index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{index}: not a valid weight index (no weight_map of file names)")
    files = [inside(path, s, str(index)) for s in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise CorruptCheckpointError(f"{index}: names missing shard {f.name}")
    return fmt, files, weight_map


def open_checkpoint(path: str | os.PathLike, label: str | None = None) -> Checkpoint:
    """Index a checkpoint without reading tensor data: a Hugging Face model folder (safetensors or `.bin`,
    sharded or not), a DCP folder (OLMo-core, torchtitan, Megatron `torch_dist`, accelerate's FSDP,
    Lightning's ModelParallel), a trainer's `torch.save` file (Lightning `.ckpt`, nanoGPT `ckpt.pt`,
    DeepSpeed's `global_stepN/`), or one weight file. `label` names it in error messages (a revision
    rather than a cache path)."""
    path = location(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    path = checkpoint_in(path)  # a step folder that holds its trainer's DCP folder: that one
    if path.is_dir() and dcp.is_dcp(path):
        tensors = dcp.index(path)
        files = sorted({e.file for r in tensors.values() for e in r.extents or [r] if r.numel})
        return Checkpoint(path, "dcp", tuple(files), tensors, label, _dcp_trainer(path))
    if path.is_file():
        fmt = of_file(path.suffix)
        if fmt is None:
            raise InputError(f"{path}: unknown checkpoint format (expected "
                             f"{', '.join(s for f in FORMATS.values() for s in f.suffixes)} or a folder)")
        files, weight_map = [path], None
    else:
        name, files, weight_map = _folder_files(path)
        fmt = FORMATS[name]
    tensors: dict[str, TensorRef] = {}
    trainer = "transformers"
    for f in files:
        trainer, refs = fmt.index_file(f)
        for key, ref in refs.items():
            if weight_map is not None and weight_map.get(key) != f.name:
                # (loaders differ: transformers takes every tensor of every shard, others only what the index says)
                raise CorruptCheckpointError(f"{f}: holds tensor {key[:200]!r}, which its index "
                                             f"{'puts in another shard' if key in weight_map else 'does not list'}")
            if key in tensors:
                raise CorruptCheckpointError(f"{path}: tensor {key!r} appears in two files")
            tensors[key] = ref
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CorruptCheckpointError(
                f"{path}: index lists {len(missing)} tensor(s) its shards lack, e.g. {missing[0]!r}"
            )
    if not tensors:
        raise InputError(f"{path}: checkpoint holds no tensors")
    if trainer == "torch":
        trainer = "transformers" if path.is_dir() else "torch"
    return Checkpoint(path, fmt.name, tuple(files), tensors, label, trainer)
