"""Where each trainer puts the steps of a run, so that a run's folder is read as its trainer saved it,
without flags: which names in it are steps, and where in a step's entry the checkpoint is. Pure
names and `stat` calls, no torch.

    run/step0/ step2/model_and_optim/   OLMo-core (step0 is the initial weights; stepN-merged/ is its
                                        own merge, not a step); Pythia-style and ckptavg's own outputs
    checkpoint/step-2/                  torchtitan
    checkpoint-2/                       transformers' Trainer (or its pytorch_model_fsdp_0/ DCP)
    epoch=0-step=2.ckpt                 Lightning's ModelCheckpoint: a file, or (ModelParallel) a DCP folder
    iter_0000002/                       Megatron
    global_step2/                       DeepSpeed
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from .names import BIN_INDEX, DCP_SUBFOLDERS, SAFETENSORS_INDEX, dcp_metadata, weight_files

DEFAULT_STEP_PATTERN = r"step(\d+)"
# (whose, a pattern whose group 1 is the step), tried on the names in a run's folder
STEP_PATTERNS = (
    ("OLMo-core or Pythia", DEFAULT_STEP_PATTERN),
    ("torchtitan", r"step-(\d+)"),
    ("transformers", r"checkpoint-(\d+)"),
    ("Lightning", r"epoch=\d+-step=(\d+)\.ckpt"),
    ("Megatron", r"iter_(\d+)"),
    ("DeepSpeed", r"global_step(\d+)"),
)


def detect_pattern(names: Iterable[str]) -> str | None:
    """The step pattern of the trainer whose names these are: the one that matches the most of them
    (None: none matches)."""
    names = list(names)
    counts = [(sum(1 for n in names if re.fullmatch(p, n)), -i, p) for i, (_, p) in enumerate(STEP_PATTERNS)]
    best = max(counts)
    return best[2] if best[0] else None


def checkpoint_in(entry: Path) -> Path:
    """The checkpoint of one step's entry: the entry itself (a folder of weights, a DCP folder, a
    `.ckpt` file), or the DCP folder a trainer saves inside it (OLMo-core, accelerate's FSDP)."""
    if entry.is_dir() and not _has_metadata(entry):
        for sub in DCP_SUBFOLDERS:
            if _has_metadata(entry / sub):
                return entry / sub
    return entry


def likely_weight_files(entry: Path) -> list[Path]:
    """The weight files that opening `entry` as a checkpoint will most likely read, from names alone: for
    work begun before torch is imported to open it (`hash_ahead`), which a wrong guess only wastes. []
    for a path that is not there or cannot be listed."""
    try:
        checkpoint = checkpoint_in(entry)
        if checkpoint.is_file():
            return [checkpoint]
        files = [checkpoint / n for n in sorted(weight_files(e.name for e in checkpoint.iterdir()))]
        root = checkpoint.resolve()
        return [f for f in files if root in f.resolve().parents]  # (a link out of it is refused, never read)
    except OSError:
        return []


def unfinished(checkpoint: Path) -> str | None:
    """Why a step's checkpoint is still being written (or was never finished), from its names (and a
    weight index) alone; None when nothing says so. A DCP save writes its `.metadata` last; a sharded
    model folder may have its index before all its shards."""
    if not checkpoint.is_dir():
        return None
    folders = [checkpoint, *(checkpoint / sub for sub in DCP_SUBFOLDERS if (checkpoint / sub).is_dir())]
    for folder in folders:
        if any(folder.glob("*.distcp")) and not _has_metadata(folder):
            return f"{folder} has DCP data files but no .metadata (a save still being written?)"
    for index, suffix in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        shard_names = [e.name for e in checkpoint.glob(f"*.{suffix}") if _SHARD.search(e.name)]
        if shard_names and not (checkpoint / index).is_file():  # (the index is written after the shards)
            return f"{checkpoint} has shards ({shard_names[0]}, ...) but no {index} (a save still being written?)"
        try:
            shards = set(json.loads((checkpoint / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue  # no index (or one that opening the checkpoint will call corrupt)
        missing = sorted(s for s in shards if not (checkpoint / str(s)).is_file())
        if missing:
            return f"{checkpoint / index} names {missing[0]}, which is not there (a save still being written?)"
    return None


def last_file_missing(entry: Path) -> str | None:
    """Why a step's entry is still being saved by a trainer that writes one file last (transformers'
    Trainer: `trainer_state.json`, after the weights, optimizer and scheduler); None when nothing says so.
    For a follower, whose reading must wait for the whole save, not only the weights."""
    if re.fullmatch(r"checkpoint-\d+", entry.name) and entry.is_dir() and not (entry / TRAINER_STATE).is_file():
        return f"{entry} has no {TRAINER_STATE} yet (transformers' Trainer writes it last)"
    return None


TRAINER_STATE = "trainer_state.json"
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")  # transformers' shard names


def _has_metadata(folder: Path) -> bool:
    return folder.is_dir() and bool(dcp_metadata(e.name for e in folder.iterdir()))
