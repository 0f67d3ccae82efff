"""The eval loss over a dataset on any backend (pissa.numeric.backend): used by training runs,
`pissa eval` and `pissa compare`."""

from __future__ import annotations

from typing import Any

from pissa.training.data import Dataset, collate


def eval_loss(backend, model: Any, data: Dataset, batch_size: int, pad: int, precision: str) -> float:
    """Mean token loss over `data`, in batches of `batch_size`, in eval mode; the model goes back
    to the mode it was in (0 for a dataset without labels)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(data.examples), batch_size):
            loss, n = backend.loss_sum(model, collate(data.examples[i:i + batch_size], pad), precision)
            total, count = total + loss, count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)
