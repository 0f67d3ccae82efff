"""Training data: JSON lines -> token ids with a loss mask -> padded batches (numpy).

Shared by both backends. Three record kinds are accepted, one per line:
  {"text": ...}                          loss on every token
  {"prompt": ..., "completion": ...}     loss on the completion only
  {"messages": [{"role", "content"}...]} formatted with the model's chat template; loss on the
                                         last message, which must be the assistant's
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pissa.errors import PissaError
from pissa.numeric.loss import IGNORE



@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int        # records cut to max_seq_len
    path: Path


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes (what --resume compares to know the data is the same)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line.

    Raises:
        PissaError: a missing or empty file, or an invalid line (its number is named).
    """
    path = Path(path)
    if not path.is_file():
        raise PissaError(f"data file {path} not found; pass a .jsonl file (see scripts/make_demo_data.py)")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PissaError(f"{path}:{n}: invalid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(rec, dict):
                raise PissaError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            records.append((n, rec))
    if not records:
        raise PissaError(f"data file {path} is empty; it needs one JSON record per line")
    return records


def record_kind(rec: dict[str, Any], where: str) -> str:
    if "messages" in rec:
        msgs = rec["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
            raise PissaError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise PissaError(f"{where}: the last message must be the assistant's (it is what the loss covers)")
        return "messages"
    if "prompt" in rec and "completion" in rec:
        return "prompt"
    if "text" in rec:
        return "text"
    raise PissaError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages'; "
                     f"this one has {sorted(rec)}")


def split_record(rec: dict[str, Any], kind: str, tokenizer: Any, where: str) -> tuple[str, str]:
    """(context, target): the text the loss ignores and the text it covers."""
    if kind == "text":
        return "", rec["text"]
    if kind == "prompt":
        return rec["prompt"], rec["completion"]
    if not getattr(tokenizer, "chat_template", None):
        raise PissaError(f"{where}: 'messages' data needs a chat template, and this model's tokenizer has "
                         "none; use prompt/completion records or a chat model")
    msgs = rec["messages"]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    context = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(context):
        raise PissaError(f"{where}: the chat template renders the conversation without the prompt as its "
                         "prefix; use prompt/completion records for this model")
    return context, full[len(context):]


def encode(context: str, target: str, kind: str, tokenizer: Any) -> Example:
    # Chat templates already hold their special tokens; plain text gets the tokenizer's (BOS)
    # and an EOS after the target so the model learns to stop.
    special = kind != "messages"
    ctx = tokenizer(context, add_special_tokens=special)["input_ids"] if context else []
    tgt = tokenizer(target, add_special_tokens=special and not ctx)["input_ids"]
    eos = tokenizer.eos_token_id
    if kind != "messages" and eos is not None and (not tgt or tgt[-1] != eos):
        tgt = tgt + [eos]
    return Example(ctx + tgt, [IGNORE] * len(ctx) + list(tgt))


def load_dataset(path: str | Path, tokenizer: Any, max_seq_len: int,
                 records: list[tuple[int, dict[str, Any]]] | None = None) -> Dataset:
    """Read, check and tokenise a JSON-lines file (or those of its `records` read already).

    Raises:
        PissaError: for a bad file or record (naming its line), or a record left with no
            target tokens once cut to max_seq_len.
    """
    if max_seq_len < 2:
        raise PissaError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    examples, truncated = [], 0
    for n, rec in read_jsonl(path) if records is None else records:
        where = f"{path}:{n}"
        kind = record_kind(rec, where)
        ex = encode(*split_record(rec, kind, tokenizer, where), kind, tokenizer)
        if len(ex.input_ids) > max_seq_len:
            truncated += 1
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
        if all(label == IGNORE for label in ex.labels[1:]):
            raise PissaError(f"{where}: nothing left to learn after cutting to --max-seq-len {max_seq_len}; "
                             "raise --max-seq-len or shorten the prompt")
        examples.append(ex)
    return Dataset(examples, truncated, Path(path))


def eval_split(path: str | Path, tokenizer: Any, max_seq_len: int,
               limit: int | None = None) -> tuple[list[tuple[str, str]], Dataset]:
    """The first `limit` records of an eval file, as (prompt, reference) pairs for generation and
    as a tokenised Dataset for the loss. Shared by both backends' `pissa eval`."""
    records = read_jsonl(path)[:limit]
    pairs = []
    for n, rec in records:
        where = f"{path}:{n}"
        kind = record_kind(rec, where)
        pairs.append(split_record(rec, kind, tokenizer, where) if kind != "text" else ("", rec["text"]))
    return pairs, load_dataset(path, tokenizer, max_seq_len, records)  # only the records it uses


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays: input_ids, labels (IGNORE on pads), attention_mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L], labels[i, :L], mask[i, :L] = e.input_ids, e.labels, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
