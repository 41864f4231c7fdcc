"""The registry of formats: each declared once, as its module's `FORMAT` (`outputs.Format`), so that adding a
format is one module and one line here. What reads a checkpoint (`open.py`) and what plans and writes an
output (`engine/`) ask here, by a checkpoint's format or by `--output-format`'s name.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError
from . import dcp, safetensors_header, torchsave
from .outputs import Format

FORMATS: dict[str, Format] = {f.name: f for f in (safetensors_header.FORMAT, torchsave.FORMAT, dcp.FORMAT)}
OUTPUTS: dict[str, Format] = {f.output: f for f in FORMATS.values()}
OUTPUT_FORMATS = tuple(OUTPUTS)
AUTO = "auto"  # the inputs' own format where ckptavg writes it (DCP, a trainer's torch.save file), else safetensors
TORCH_SAVE_FILES = torchsave.TORCH_SAVE_FILES


def of_file(suffix: str) -> Format | None:
    """The format of a file named alone, by its suffix."""
    return next((f for f in FORMATS.values() if suffix in f.suffixes), None)


def resolve_format(asked: str, input_formats: Sequence[str], trainer: str) -> str:
    """The output format for inputs of `input_formats` saved by `trainer`: `asked`, or for "auto" the
    inputs' own where ckptavg writes it (an average of DCP checkpoints is a DCP checkpoint, of Lightning
    checkpoints a `.ckpt`), else safetensors."""
    if asked == AUTO:
        if input_formats and all(f == "dcp" for f in input_formats):
            return "dcp"
        return "torch" if trainer in TORCH_SAVE_FILES else "safetensors"
    if asked not in OUTPUT_FORMATS:
        raise ValueError(f"output format {asked!r} is not one of {(AUTO, *OUTPUT_FORMATS)}")
    if asked == "torch" and (trainer not in TORCH_SAVE_FILES or "dcp" in input_formats):
        raise InputError(f"--output-format torch writes a trainer's own file ({', '.join(TORCH_SAVE_FILES)}); "
                         f"these inputs were saved by {trainer}")
    return asked
