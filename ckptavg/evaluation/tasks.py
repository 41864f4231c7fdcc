"""Perplexity tasks for lm-eval from local text: the four PILE subsets of the paper, or any jsonl.

lm-eval's own `pile_*` tasks no longer run (their dataset is gone), so the subsets are cut out
of a local Pile-format file (`{"text", "meta": {"pile_set_name"}}` per line, as in the Pile's
val/test files), written once to ckptavg's cache, and registered through lm-eval's own mechanism:
a task YAML in an include path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

from ..atomic import replacing, write_text
from ..errors import InputError
from ..hashing import cache_root

PILE_SUBSETS = {
    "pile-philpapers": "PhilPapers",
    "pile-bookcorpus2": "BookCorpus2",
    "pile-youtubesubtitles": "YoutubeSubtitles",
    "pile-enron": "Enron Emails",
}
PERPLEXITY_METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                      "bits_per_byte": "bits_per_byte"}  # metric -> lm-eval aggregation


def task_yaml(name: str, data_file: Path) -> str:
    """A rolling-loglikelihood task over a jsonl file of {"text": ...} records."""
    import yaml

    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).absolute())}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                        for m, agg in PERPLEXITY_METRICS.items()],
    }
    return yaml.safe_dump(task, sort_keys=False)


def perplexity_tasks(files: Mapping[str, Path], task_dir: Path | None = None) -> Path:
    """Register `name -> jsonl file` as lm-eval tasks in `task_dir` (an include path; by default a
    folder in ckptavg's cache named by the tasks, so that no stale YAML is ever picked up)."""
    if task_dir is None:
        key = repr(sorted((name, str(Path(p).absolute())) for name, p in files.items()))
        task_dir = cache_root() / "ppl-tasks" / hashlib.sha1(key.encode()).hexdigest()[:16]
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file (for the perplexity task {name!r})")
        write_text(task_dir / f"{name}.yaml", task_yaml(name, Path(path)))
    return task_dir


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                raise InputError(f"{path}:{n}: not a JSON line (expected Pile format: "
                                 f'{{"text": ..., "meta": {{"pile_set_name": ...}}}})') from None


def pile_tasks(pile: Path, wanted: list[str], root: Path | None = None) -> Path:
    """Cut the `wanted` PILE subsets out of `pile` once (cached by the file's identity) and return the
    include path holding their task YAMLs. Subsets the file lacks are an error naming them."""
    pile = Path(pile)
    if not pile.is_file():
        raise InputError(f"{pile}: no such Pile file")
    st = pile.stat()
    key = hashlib.sha1(f"{pile.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = (root or cache_root()) / "pile" / key
    done = folder / "subsets.json"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        by_set = {s: t for t, s in PILE_SUBSETS.items()}
        counts = dict.fromkeys(PILE_SUBSETS, 0)
        with ExitStack() as stack:  # every subset appears whole once the pass is done, or none does
            outs = {t: stack.enter_context(open(stack.enter_context(replacing(folder / f"{t}.jsonl")), "w",
                                                encoding="utf-8")) for t in PILE_SUBSETS}
            for rec in _records(pile):
                task = by_set.get((rec.get("meta") or {}).get("pile_set_name"))
                if task and isinstance(rec.get("text"), str):
                    outs[task].write(json.dumps({"text": rec["text"]}) + "\n")
                    counts[task] += 1
        write_text(done, json.dumps({"source": str(pile.resolve()), "documents": counts}))
    counts = json.loads(done.read_text())["documents"]
    lacking = [t for t in wanted if counts.get(t, 0) == 0]
    if lacking:
        raise InputError(f"{pile} has no documents for {', '.join(f'{t} ({PILE_SUBSETS[t]})' for t in lacking)}; "
                         f"the pile-uncopyrighted copy, for one, lacks BookCorpus2 and YoutubeSubtitles")
    return perplexity_tasks({t: folder / f"{t}.jsonl" for t in wanted}, folder / "tasks")
