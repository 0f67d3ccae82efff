"""What fine-tuning costs the model, measured offline ("LoRA Learns Less and Forgets Less",
arXiv 2405.09673): the data, the batches and the arithmetic; the forward passes are the backends'
(pissa.studies.evaluate.Session: the backend's logits, the KL of pissa.numeric.kl).

- General text (resources/general_text.jsonl, English prose and Python code; provenance in
  resources/README.md): the mean token loss of the fine-tuned model, and the mean per-token
  KL(p_base || p_tuned) of its next-token distribution from the base model's.
- Knowledge probe (resources/probe.jsonl): cloze multiple-choice questions that the base model
  answers right. Each option is scored as HellaSwag's and ARC's normalised accuracy does it: the
  mean log-likelihood of its tokens after the question; the highest score is the answer. The
  metric is the share of questions still answered right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pissa.training import data
from pissa.numeric.loss import IGNORE
from pissa.training.data import Example, collate

RESOURCES = Path(__file__).resolve().parent / "resources"
GENERAL = RESOURCES / "general_text.jsonl"
PROBE = RESOURCES / "probe.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in data.read_jsonl(path)]


# ---------------------------------------------------------------------- general text
def general_examples(tokenizer: Any, max_tokens: int, seq_len: int = 256, path: Path = GENERAL) -> list[Example]:
    """The general-text records in file order, each cut to seq_len tokens, until max_tokens tokens
    are taken: loss (and KL) on every token but the first of each sequence."""
    out, total = [], 0
    for rec in read_jsonl(path):
        ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"][:seq_len]
        ids = ids[: max(2, max_tokens - total)]
        out.append(Example(ids, list(ids)))
        total += len(ids)
        if total >= max_tokens:
            break
    return out


def batches(examples: list[Example], batch_size: int, pad: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad)


@dataclass
class GeneralScore:
    """Sums over the predicted tokens of the general text."""

    nll: float = 0.0
    kl: float = 0.0
    tokens: int = 0

    def add(self, nll: np.ndarray, kl: np.ndarray, count: np.ndarray) -> None:
        """Per-row sums (pissa.studies.evaluate.Session.token_stats)."""
        self.nll += float(np.sum(nll))
        self.kl += float(np.sum(kl))
        self.tokens += int(np.sum(count))

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {"general_loss": self.nll / n, "general_kl": self.kl / n}


# ---------------------------------------------------------------------- knowledge probe
def probe_items(path: Path = PROBE) -> list[dict[str, Any]]:
    """[{"question", "options", "answer" (index), "category"}]."""
    return read_jsonl(path)


def probe_examples(tokenizer: Any, items: list[dict[str, Any]]) -> list[Example]:
    """One example per (question, option), the option's tokens labelled: the question tokenised
    as a prompt and the option as its completion, as pissa.training.data encodes prompt/completion data."""
    out = []
    for item in items:
        ctx = tokenizer(item["question"], add_special_tokens=True)["input_ids"]
        for option in item["options"]:
            tgt = tokenizer(option, add_special_tokens=False)["input_ids"]
            out.append(Example(ctx + tgt, [IGNORE] * len(ctx) + tgt))
    return out


def option_scores(items: list[dict[str, Any]], logprob_sums: np.ndarray, counts: np.ndarray) -> list[list[float]]:
    """Per question, each option's mean log-likelihood per token, from per-example sums and
    counts in probe_examples' order."""
    means = np.asarray(logprob_sums, dtype=np.float64) / np.maximum(np.asarray(counts), 1)
    out, i = [], 0
    for item in items:
        k = len(item["options"])
        out.append([float(x) for x in means[i:i + k]])
        i += k
    return out


def probe_accuracy(items: list[dict[str, Any]], scores: list[list[float]]) -> float:
    """The share of questions whose highest-scored option is the answer (ties: the first)."""
    right = sum(int(np.argmax(s)) == item["answer"] for item, s in zip(items, scores))
    return right / max(len(items), 1)
