"""What the files of a checkpoint are called (a Hugging Face model folder, a DCP folder, a trainer's
`torch.save` files): the one place that knows, without torch.

The engine reads and writes these files; trajectory sources decide from a branch's file list
which files make a checkpoint, before anything is downloaded. Both ask here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"  # in DeepSpeed's global_stepN/ (ZeRO 0-2; one model-parallel rank)
NANOGPT_CHECKPOINT = "ckpt.pt"  # nanoGPT's out_dir/ckpt.pt
BIN_INDEX = "pytorch_model.bin.index.json"
# Looked for in a folder in this order: the first one present decides the checkpoint's format.
WEIGHT_LAYOUTS = (
    (SAFETENSORS_INDEX, "safetensors"),
    ("model.safetensors", "safetensors"),
    (BIN_INDEX, "bin"),
    ("pytorch_model.bin", "bin"),
    (DEEPSPEED_MODEL, "bin"),
    (NANOGPT_CHECKPOINT, "bin"),
)
# Non-weight files a model folder needs to be loaded and used; an output copies them from its newest input.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
_BIN = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
DCP_METADATA = ".metadata"  # a torch.distributed.checkpoint folder: written last, it marks the save finished
_DCP = re.compile(r"__\d+_\d+\.distcp")
# a save without collectives (`dcp.save(..., use_collectives=False)`) leaves one metadata file per rank instead
DCP_RANK_METADATA = re.compile(r"__(\d{1,6})\.metadata")  # (a million ranks: the name bounds the count)


def dcp_metadata(names: Iterable[str]) -> list[str]:
    """The DCP metadata files among `names`: the global `.metadata`, else every rank's; [] for none."""
    names = set(names)
    if DCP_METADATA in names:
        return [DCP_METADATA]
    return sorted((n for n in names if DCP_RANK_METADATA.fullmatch(n)), key=lambda n: int(n[2:-9]))
# trainers that save a DCP folder inside each step's folder: OLMo-core's stepN/model_and_optim/, accelerate's
# FSDP checkpoint-N/pytorch_model_fsdp_0/ (an average of theirs is laid out the same way)
DCP_SUBFOLDER_OF = {"olmo-core": "model_and_optim", "accelerate": "pytorch_model_fsdp_0"}
DCP_SUBFOLDERS = tuple(DCP_SUBFOLDER_OF.values())
TORCH_SAVE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # a single weight file: torch.save's archives
# what a trainer keeps beside a DCP folder's data, copied from the newest input into a DCP average so that the
# trainer takes it as one of its own: Lightning's meta.pt (ModelParallel), megatron-core's metadata.json and
# common.pt (its non-sharded state)
DCP_SIDE_FILES = ("meta.pt", "metadata.json", "common.pt")


def weight_layout(names: Iterable[str]) -> tuple[str, str] | None:
    """(the file that decides, its format) for a folder holding `names`: the first of `WEIGHT_LAYOUTS`
    there. The one detector: opening a checkpoint and choosing a branch's files both ask it."""
    names = set(names)
    return next(((n, fmt) for n, fmt in WEIGHT_LAYOUTS if n in names), None)


def weight_files(names: Iterable[str]) -> set[str]:
    """The weight files among `names`: a DCP folder's data files; else the files of the first of
    `WEIGHT_LAYOUTS` there (an index's shards by their names); else shards whose index is not there yet.
    Never `training_args.bin` or optimizer states."""
    names = set(names)
    if dcp_metadata(names):
        return {n for n in names if _DCP.fullmatch(n)}
    found = weight_layout(names)
    if found is not None and not found[0].endswith(".index.json"):
        return {found[0]}
    patterns = [_SAFETENSORS if found[1] == "safetensors" else _BIN] if found else [_SAFETENSORS, _BIN]
    for pattern in patterns:
        weights = {n for n in names if pattern.fullmatch(n)}
        if weights:
            return weights
    return set()


def pick_files(names: Iterable[str]) -> set[str] | None:
    """The files that make one checkpoint: its weight files, their index and the side files a model
    folder needs; None when there are no weights at all."""
    names = set(names)
    weights = weight_files(names)
    if not weights:
        return None
    first = next(iter(weights))
    index = {SAFETENSORS_INDEX} if first.endswith(".safetensors") else set(dcp_metadata(names)) \
        if first.endswith(".distcp") else {BIN_INDEX}
    return weights | (index & names) | (set(SIDE_FILES) & names)
