"""One resident model per study: built once, its weights replaced in place for every checkpoint it scores.

A trajectory's checkpoints share their config and tokenizer, so building a model for each of them
(allocation, initialisation, a fresh lm-eval wrapper: for a 12B model 24 GB each time) is wasted
work. The first checkpoint is loaded by transformers' own `from_pretrained`; every later one has its
tensors read straight into the parameters, and an average made in memory is made by the averaging
engine straight into them (on the model's device): it never exists anywhere else, and host memory
stays O(largest tensor) however large the model.

Stored names are mapped to parameters by transformers' own renaming rules (Pythia's `embed_out`
is `lm_head` in transformers 5), and the mapping is checked once against the model transformers
loaded: every parameter covered, shapes and values equal. Where transformers does more than rename on
loading (fusing or splitting tensors), `ResidentUnsupported` says so and the caller builds a fresh
model per checkpoint, as before. lm-eval's response cache is never used (it does not key on the
weights: lm-eval #2715, #4063); that a resident model scores exactly as fresh ones is tested.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.index import Checkpoint
from ..checkpoints.names import SIDE_FILES
from ..checkpoints.open import open_checkpoint
from ..engine.average import average_into
from ..engine.plan import AveragePlan
from ..engine.tensors import TensorReader
from ..errors import InputError

_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


class ResidentUnsupported(Exception):
    """This architecture's weights cannot be swapped in place faithfully; build a fresh model instead."""


def identity(folder: Path) -> str:
    """What must be equal for two checkpoints to share a model: the config (but for where it was saved
    from and by which transformers) and the tokenizer files' bytes."""
    digest = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}/config.json: {e}") from None
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name in SIDE_FILES[1:]:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def _renamer(model) -> Callable[[str], str]:
    """stored name -> the model's state-dict key, by transformers' own rules (transformers 5 keeps them
    in `conversion_mapping`; transformers 4 loads names as stored, bar the base-model prefix)."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        def rename(name: str) -> str:
            if prefix and name not in state and f"{prefix}.{name}" in state:
                return f"{prefix}.{name}"
            if prefix and name.startswith(prefix + ".") and name not in state:
                return name.removeprefix(prefix + ".")
            return name
        return rename
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(name: str) -> str:
        try:
            key, converted = rename_source_key(name, renamings, converters, prefix or None, state)
        except TypeError as e:  # another transformers' signature: do not guess
            raise ResidentUnsupported(f"transformers' renaming rules could not be applied ({e})") from None
        if converted is not None:
            raise ResidentUnsupported(f"{type(model).__name__} converts {name!r} on loading, not only renames it")
        return key
    return rename


@dataclass(frozen=True)
class _Loaded:
    key: str
    model: object
    lm: object
    rename: Callable[[str], str]

    def destinations(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """stored name -> the tensor it is loaded into; a name the model has no place for is ignored, as
        transformers ignores it; a parameter no name reaches is an error."""
        state = self.model.state_dict(keep_vars=True)
        out = {}
        for name in names:
            key = self.rename(name)
            if key in state:
                out[name] = state[key].data
        reached = {t.data_ptr() for t in out.values()}
        missing = sorted(k for k, t in state.items() if t.data_ptr() not in reached)
        if missing:
            raise InputError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
        return out


class ResidentModel:
    """The lm-eval model scoring a study's checkpoints: rebuilt only when config or tokenizer change."""

    def __init__(self, device: str, dtype: str, batch_size: str, *, trust_remote_code: bool = False) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.trust_remote_code = trust_remote_code
        self.loaded: _Loaded | None = None
        self.builds = 0

    def lm(self, folder: Path, average: AveragePlan | None = None):
        """The model holding `folder`'s weights, or (`average`) the plan's average, made into it; `folder`
        gives config and tokenizer."""
        key = identity(folder)
        fresh = self.loaded is None or self.loaded.key != key
        if fresh:
            self._build(folder, key)
            if average is None:
                return self.loaded.lm
        try:
            if average is not None:
                average_into(average, self.loaded.destinations(j.name for j in average.jobs), device=self.device)
            else:
                checkpoint = open_checkpoint(folder)
                _copy_into(checkpoint, self.loaded.destinations(checkpoint.tensors))
        except BaseException:
            self.loaded = None  # weights half replaced: the next checkpoint builds afresh
            raise
        return self.loaded.lm

    def _build(self, folder: Path, key: str) -> None:
        """The first checkpoint is loaded exactly as a fresh model is (`harness.load_model`)."""
        from .harness import load_model

        self.loaded = None
        gc.collect()  # the previous model's memory goes back before the next one is allocated
        lm = load_model(folder, self.device, self.dtype, self.batch_size, trust_remote_code=self.trust_remote_code)
        loaded = _Loaded(key, lm.model, lm, _renamer(lm.model))
        _check_mapping(loaded, open_checkpoint(folder))
        self.loaded = loaded
        self.builds += 1


CHECKED_ELEMENTS = 65536  # per tensor: enough to tell any two tensors of random-looking weights apart


def _check_mapping(loaded: _Loaded, checkpoint: Checkpoint) -> None:
    """Once per model: each name maps to a parameter of its shape that holds what transformers loaded
    from it. The leading elements of each tensor are compared, which tells a wrong name, a transposed
    or fused tensor from the right one; a full second read of a 12B checkpoint would add nothing."""
    try:
        destinations = loaded.destinations(checkpoint.tensors)
    except InputError as e:
        raise ResidentUnsupported(f"{checkpoint.shown}: {e} after renaming as transformers does") from None
    buffer = torch.empty(CHECKED_ELEMENTS * 8, dtype=torch.uint8)
    with TensorReader() as reader:
        for name, dest in destinations.items():
            ref = checkpoint.tensors[name]
            n = min(ref.numel, CHECKED_ELEMENTS)
            stored = reader.read(ref, 0, n, buffer)
            if (tuple(dest.shape) != ref.shape
                    or not torch.equal(dest.detach().reshape(-1)[:n].cpu(), stored.to(dest.dtype))):
                raise ResidentUnsupported(f"{checkpoint.shown}: {name!r} is not loaded as stored")


def _copy_into(checkpoint: Checkpoint, destinations: dict[str, torch.Tensor]) -> None:
    """Each stored tensor into its parameter: read straight into it where dtype and device allow, else
    through one buffer (the largest tensor) and cast on the copy, as `from_pretrained` casts."""
    buffer = torch.empty(0, dtype=torch.uint8)
    with TensorReader() as reader:
        for name, dest in destinations.items():
            ref = checkpoint.tensors[name]
            if dest.numel() != ref.numel:
                raise InputError(f"{checkpoint.shown}: {name} has {ref.numel} elements, the model {dest.numel()}")
            if dest.device.type == "cpu" and dest.dtype == ref.dtype and dest.is_contiguous():
                reader.read(ref, 0, ref.numel, dest.view(-1).view(torch.uint8))
                continue
            if buffer.numel() < ref.nbytes:
                buffer = torch.empty(ref.nbytes, dtype=torch.uint8)
            dest.view(-1).copy_(reader.read(ref, 0, ref.numel, buffer))
