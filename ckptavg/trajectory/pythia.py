"""The EleutherAI Pythia suite: repo ids, revisions, sizes and training cost. Data only."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError

TOTAL_STEPS = 143_000
# the paper's outputs: every 3000 steps from 21000 to 141000 (LAWA k=5, nu=1000)
PAPER_START, PAPER_END, PAPER_INTERVAL = 21_000, 141_000, 3_000
TOKENS_PER_STEP = 2_097_152  # a batch of 1024 sequences of 2048 tokens
ORG = "EleutherAI"


@dataclass(frozen=True)
class PythiaModel:
    size: str
    params: int
    fp16_bytes: int  # approximate bytes of one revision's weights (fp16)
    gpu_hours: float | None  # A100-40GB hours for the whole run (Biderman et al. 2023), where published
    learning_rate: float

    def repo_id(self, deduped: bool = True) -> str:
        return f"{ORG}/pythia-{self.size}" + ("-deduped" if deduped else "")


MODELS: dict[str, PythiaModel] = {m.size: m for m in (
    PythiaModel("70m", 70_426_624, 166_000_000, None, 1.0e-3),
    PythiaModel("160m", 162_322_944, 375_000_000, None, 6.0e-4),
    PythiaModel("410m", 405_334_016, 911_000_000, None, 3.0e-4),
    PythiaModel("1b", 1_011_781_632, 2_100_000_000, 4_830, 3.0e-4),
    PythiaModel("1.4b", 1_414_647_808, 2_930_000_000, None, 2.0e-4),
    PythiaModel("2.8b", 2_775_208_960, 5_680_000_000, 14_240, 1.6e-4),
    PythiaModel("6.9b", 6_857_302_016, 13_900_000_000, 33_500, 1.2e-4),
    PythiaModel("12b", 11_846_072_320, 23_800_000_000, 72_300, 1.2e-4),
)}


def model(size: str) -> PythiaModel:
    key = size.lower().removeprefix("pythia-")
    if key not in MODELS:
        raise OptionError(f"unknown Pythia size {size!r} (choose from {', '.join(MODELS)})")
    return MODELS[key]


def revisions() -> list[str]:
    """The 154 branches of every Pythia repo: step0, step1, 2, 4 ... 512, then every 1000 to 143000."""
    return ["step0"] + [f"step{2 ** i}" for i in range(10)] + [f"step{s}" for s in range(1000, TOTAL_STEPS + 1, 1000)]


def steps() -> list[int]:
    return [int(r.removeprefix("step")) for r in revisions()]
