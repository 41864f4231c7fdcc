"""How much two checkpoints disagree: the paper's motivation for averaging (Sec. 2) made measurable.

Averaging helps when the checkpoints it averages make different predictions. For two models on the
same text, at every position that predicts a token of the text, this counts how often their most
likely next tokens differ (argmax disagreement) and averages KL(A || B) between their next-token
distributions, in nats. Texts longer than the model's context are cut into consecutive windows,
each starting afresh; the first token of each text is predicted from an end-of-text token, as
lm-eval's perplexity tasks do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..report.store import Row

TASK_PREFIX = "diversity:"  # the store's task name: diversity:TEXT-NAME
METRICS = ("argmax_disagreement", "kl_nats")


@dataclass(frozen=True)
class Diversity:
    argmax_disagreement: float  # fraction of positions whose argmax tokens differ
    kl_nats: float  # mean KL(A || B) per position
    positions: int


def read_texts(path: Path) -> list[str]:
    """A .jsonl file of {"text": ...} records (as for --ppl-task), or any other file as one text."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: {e}") from None
    if Path(path).suffix != ".jsonl":
        texts = [raw]
    else:
        try:
            texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a jsonl file of {{\"text\": ...}} records ({e})") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{path}: no text")
    return texts


def windows(tokenizer, texts: Sequence[str], context: int) -> list[list[int]]:
    """Model inputs: each text's tokens after an end-of-text token, less the last, in `context`-long pieces."""
    eot = tokenizer.eos_token_id
    if eot is None:
        raise InputError("the tokenizer has no end-of-text token to start each text from")
    out = []
    for text in texts:
        ids = [eot, *tokenizer(text, add_special_tokens=False)["input_ids"]][:-1]
        out += [ids[i : i + context] for i in range(0, len(ids), context)]
    return out


@torch.no_grad()
def measure(model_a, model_b, tokenizer, texts: Sequence[str], context: int | None = None) -> Diversity:
    """Argmax disagreement and mean KL(A || B) of two loaded models (same tokenizer) over `texts`."""
    context = context or model_a.config.max_position_embeddings
    device = next(model_a.parameters()).device
    differ, positions, kl = 0, 0, torch.zeros((), dtype=torch.float64)
    for ids in windows(tokenizer, texts, context):
        x = torch.tensor([ids], device=device)
        a = torch.log_softmax(model_a(x).logits[0].float(), -1)
        b = torch.log_softmax(model_b(x).logits[0].float(), -1)
        differ += int((a.argmax(-1) != b.argmax(-1)).sum())
        kl += (a.exp() * (a - b)).sum(-1).double().sum().cpu()
        positions += len(ids)
    return Diversity(differ / positions, float(kl) / positions, positions)


def rows(found: Diversity, model: str, tag: str, step: int, task: str, where: str, dtype: str,
         device: str) -> list[Row]:
    """The store's rows of one measurement (method "diversity"; batch size 1: one text window at a time)."""
    import time

    from .. import __version__

    return [Row(model, tag, "diversity", None, None, step, task, metric, getattr(found, metric), None, None, 0, "ok",
                "", f"ckptavg {__version__}", where, time.time(), "1", dtype, device) for metric in METRICS]
