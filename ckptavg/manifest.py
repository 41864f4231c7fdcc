"""The manifest (`ckptavg.json`): what an output is, how it was made, from what. Written last, it is
also what marks an output finished.

The JSON is a contract with every later reader (`ckptavg eval`, resumed runs, other tools), so it
is typed here, once: a writer builds a `Manifest`, a reader gets one back, and an unknown version
is an error rather than a misread. Torch-free: planning and reporting read manifests too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .storage.paths import RemotePath, location

MANIFEST = "ckptavg.json"
VERSION = 1
# sha256_source values: hashed now, hashed before (cached), a Hub download ckptavg hashed when it
# fetched it, a Hub cache blob's name taken on trust (ckptavg neither downloaded nor checked it)
SHA256_SOURCES = ("computed", "cache", "verified", "hub-blob")


def _compact(obj: Any) -> dict:
    """A dataclass as JSON: tuples as lists, None and empty optional fields left out."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or (value == () and f.default == ()):
            continue
        if isinstance(value, tuple):
            value = [_compact(v) if hasattr(v, "__dataclass_fields__") else v for v in value]
        elif hasattr(value, "__dataclass_fields__"):
            value = _compact(value)
        out[f.name] = value
    return out


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str | None = None
    sha256_source: str | None = None  # one of SHA256_SOURCES
    etag: str | None = None  # an object on a store: its ETag (or checksum) when the average read it


@dataclass(frozen=True)
class Provenance:
    """Where a trajectory's checkpoint came from (`Source.describe`): the trajectory fields of its `InputRecord`."""

    source: str  # the trajectory: a local folder, a URL, or hf://ORG/NAME
    step: int
    repo: str | None = None  # on the Hub: the repo, the branch and its commit, the step pattern, the cache
    revision: str | None = None
    commit: str | None = None
    pattern: str | None = None
    cache_dir: str | None = None


@dataclass(frozen=True)
class InputRecord:
    """One input checkpoint, oldest first; the trajectory fields (a `Provenance`'s) say where it came from."""

    path: str
    format: str  # safetensors | bin (torch.save archives) | dcp
    files: tuple[FileRecord, ...]
    absent_buffers: tuple[str, ...] = ()  # never-averaged tensors other inputs hold and this one lacks
    source: str | None = None  # the trajectory: a local folder, or hf://ORG/NAME
    step: int | None = None
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    pattern: str | None = None
    cache_dir: str | None = None  # the Hugging Face cache it was downloaded into
    trainer: str | None = None  # whose layout it is (`Checkpoint.trainer`): transformers, olmo-core, lightning...

    @classmethod
    def from_json(cls, d: dict) -> InputRecord:
        return cls(**(d | {"files": tuple(FileRecord(**f) for f in d["files"]),
                           "absent_buffers": tuple(d.get("absent_buffers", ()))}))


_METHOD_FIELDS = ("name", "step", "k", "nu", "interval", "members")


@dataclass(frozen=True)
class Method:
    """How the weights were chosen. `params` holds what only one method has (EMA's alpha and dropped
    tail weight, SWA's start, an interpolation's alpha and endpoints); in JSON they sit beside the rest."""

    name: str
    step: int | None = None  # the output's place on the trajectory; None for `average` and `interpolate`
    k: int | None = None
    nu: int | None = None
    interval: int | None = None
    members: tuple[int, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"name": self.name, "k": self.k, "nu": self.nu, "interval": self.interval, "step": self.step,
               "members": list(self.members) or None}
        return {k: v for k, v in out.items() if v is not None} | self.params

    @classmethod
    def from_json(cls, d: dict) -> Method:
        known = {k: d[k] for k in _METHOD_FIELDS if k in d}
        known["members"] = tuple(known.get("members", ()))
        return cls(**known, params={k: v for k, v in d.items() if k not in _METHOD_FIELDS})


@dataclass(frozen=True)
class RunId:
    """The trajectory run an output belongs to: `ckptavg eval` groups and stores scores by it."""

    model: str  # the trajectory's name, e.g. pythia-1b-deduped
    tag: str  # the run's method and parameters, e.g. lawa-k5-nu1000


@dataclass(frozen=True)
class DtypePolicy:
    output: str
    accumulate: str
    not_averaged: str
    copy_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardRecord:
    name: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class OutputRecord:
    files: tuple[ShardRecord, ...]
    tensor_bytes: int
    side_files_from_newest_input: tuple[str, ...] = ()
    format: str = "safetensors"  # one of checkpoints.formats.OUTPUT_FORMATS


@dataclass(frozen=True)
class Manifest:
    created: str
    method: Method
    weights: tuple[float, ...]
    normalized: bool
    inputs: tuple[InputRecord, ...]
    dtype_policy: DtypePolicy
    copied_tensors: dict[str, str]  # name -> why it was copied from the newest input
    output: OutputRecord
    device: str
    seconds: float
    versions: dict[str, str]
    run: RunId | None = None
    version: int = VERSION
    ranks: int = 1  # processes that shared the average (torchrun, srun); `seconds` is the whole run's

    @property
    def newest(self) -> InputRecord:
        return self.inputs[-1]

    def to_json(self) -> dict:
        out: dict[str, Any] = {"ckptavg_manifest": self.version, "created": self.created,
                               "method": self.method.to_json()}
        if self.run is not None:
            out["run"] = _compact(self.run)
        return out | {
            "weights": list(self.weights),
            "normalized": self.normalized,
            "inputs": [_compact(i) for i in self.inputs],
            "dtype_policy": _compact(self.dtype_policy),
            "copied_tensors": self.copied_tensors,
            "output": _compact(self.output),
            "device": self.device,
            "seconds": self.seconds,
            **({"ranks": self.ranks} if self.ranks > 1 else {}),
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, d: dict, where: str = "manifest") -> Manifest:
        version = d.get("ckptavg_manifest") if isinstance(d, dict) else None
        if version != VERSION:
            raise ManifestError(f"{where}: manifest version {version!r} is not one this ckptavg reads ({VERSION}); "
                                f"a newer ckptavg wrote it, or it is not a ckptavg manifest")
        try:
            out = d["output"]
            return cls(
                created=d["created"], method=Method.from_json(d["method"]), weights=tuple(d["weights"]),
                normalized=d["normalized"], inputs=tuple(InputRecord.from_json(i) for i in d["inputs"]),
                dtype_policy=DtypePolicy(**(d["dtype_policy"] | {"copy_patterns": tuple(
                    d["dtype_policy"].get("copy_patterns", ()))})),
                copied_tensors=dict(d["copied_tensors"]),
                output=OutputRecord(tuple(ShardRecord(**s) for s in out["files"]), out["tensor_bytes"],
                                    tuple(out.get("side_files_from_newest_input", ())),
                                    out.get("format", "safetensors")),
                device=d["device"], seconds=d["seconds"], versions=dict(d["versions"]),
                run=RunId(**d["run"]) if "run" in d else None, version=version, ranks=int(d.get("ranks", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed ckptavg manifest ({type(e).__name__}: {e})") from None


def read_manifest(folder: str | Path | RemotePath) -> Manifest | None:
    """The manifest of a finished output (a folder, or a prefix on a store); None when the folder is absent
    or unfinished."""
    path = location(folder) / MANIFEST
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        raw = json.loads(text)
    except ValueError:
        raise ManifestError(f"{path}: not JSON; delete the folder to have it made again") from None
    return Manifest.from_json(raw, str(path))


def is_finished(folder: str | Path | RemotePath) -> bool:
    """Whether an output is complete: the one rule, used by resumed runs, `interpolate` and `eval`.
    The manifest is written last, after every other file is fsynced, so its presence is the mark."""
    return (location(folder) / MANIFEST).is_file()


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.to_json(), indent=2) + "\n"
