"""The eval loss over a dataset on any backend (pissa.numeric.backend): used by training runs,
`pissa eval` and `pissa compare`."""

from __future__ import annotations

from typing import Any

from pissa.training.batches import collate_rows, cut, pack
from pissa.training.data import Dataset


def eval_rows(data: Dataset, max_len: int | None) -> list[list[int]]:
    """The rows an eval reads the examples in, in file order: packed into rows of max_len tokens
    (pissa.training.batches), or one example per row when max_len is None."""
    n = len(data.examples)
    if max_len is None:
        return [[i] for i in range(n)]
    return pack(range(n), [len(e.input_ids) for e in data.examples], max(max_len, 1))


def eval_loss(backend, model: Any, data: Dataset, batch_size: int | None, pad: int, precision: str,
              max_len: int | None = None, batch_tokens: int | None = None) -> float:
    """Mean token loss over `data`, `batch_size` rows at a time (or rows of at most `batch_tokens`
    real tokens: pissa.training.batches.cut), in eval mode (the model goes back to the mode it was
    in; 0 for a dataset without labels). With max_len the examples are packed into rows of at most
    max_len tokens: the same loss, with no compute spent on padding."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = eval_rows(data, max_len)
    sizes = [sum(len(data.examples[i].input_ids) for i in row) for row in rows]
    try:
        for batch in cut(rows, sizes, batch_size, batch_tokens):
            loss, n = backend.loss_sum(model, collate_rows(data.examples, batch, pad), precision)
            total, count = total + loss, count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)
