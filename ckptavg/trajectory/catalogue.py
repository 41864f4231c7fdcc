"""The Pythia catalogue as a trajectory source for plans made offline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueTrajectory:
    """A Pythia repo as the built-in catalogue describes it (revisions, approximate fp16 sizes): what a
    dry run plans from, offline."""

    size: str
    deduped: bool = True
    missing_hint = ""
    local = False

    @property
    def name(self) -> str:
        from . import pythia

        return pythia.model(self.size).repo_id(self.deduped).split("/")[1]

    def steps(self) -> list[int]:
        from . import pythia

        return pythia.steps()

    def sizes(self) -> dict[int, int]:
        from . import pythia

        return dict.fromkeys(self.steps(), pythia.model(self.size).fp16_bytes)
