"""Accumulation by tokens: `--batch-size 2 --grad-accum 2` is `--batch-size 4`, on records whose label
counts differ by about 50x, on both backends, packed and unpacked. A step's loss and gradient are its
summed token losses over the step's label count (transformers' num_items_in_batch); a mean of the
micro-batches' own means would weigh a token of a micro-batch with few labels far more."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.safetensors import load
from pissa.training.batches import Plan
from pissa.numeric.loss import IGNORE
from pissa.training.data import load_dataset
from pissa.files.tokenizer import load_tokenizer
from tests.conftest import BACKENDS

TRAINING = [b for b in BACKENDS if b != "numpy"]
SEQ, STEPS = 192, 3


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory, tiny_chat):
    """12 records, each alone in a row of SEQ: half label 3 tokens (a long prompt, a one-word answer),
    half about 150 (a short prompt, a long answer)."""
    path = tmp_path_factory.mktemp("lopsided") / "train.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rows = []
    for i in range(6):
        rows.append({"prompt": " ".join(words[(i + k) % 10] for k in range(75)) + " Answer:", "completion": f" {i}"})
        rows.append({"prompt": f"Count {i}:", "completion": " " + " ".join(words[(i + k) % 10] for k in range(110))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_dataset(path, load_tokenizer(tiny_chat), SEQ).examples
    counts = [sum(label != IGNORE for label in e.labels[1:]) for e in examples]
    assert max(counts) >= 50 * min(counts) and all(len(e.input_ids) > SEQ // 2 for e in examples), counts
    return path, examples, counts


def train(backend, model, data, out, batch, accum, *extra):
    return main(["train", str(model), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
                 "--batch-size", str(batch), "--grad-accum", str(accum), "--max-seq-len", str(SEQ), "--lr", "3e-3",
                 "--backend", backend, "--no-progress", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["packed", "unpacked"])
@pytest.mark.parametrize("backend", TRAINING)
def test_two_micro_batches_of_two_are_one_batch_of_four(backend, packing, lopsided, tiny_chat, tmp_path):
    data, examples, counts = lopsided
    extra = () if packing == "packed" else ("--no-packing",)
    # The two micro-batches of some step hold very different label counts (else the test proves nothing).
    plan = Plan([len(e.input_ids) for e in examples], 2, SEQ, 0, "packed" if packing == "packed" else "padded")
    per_micro = [sum(counts[i] for row in plan.micro(k) for i in row) for k in range(2 * STEPS)]
    assert max(max(a, b) / min(a, b) for a, b in zip(per_micro[::2], per_micro[1::2])) > 10, per_micro

    one, two = tmp_path / "b4", tmp_path / "b2x2"
    assert train(backend, tiny_chat, data, one, 4, 1, *extra) == 0
    assert train(backend, tiny_chat, data, two, 2, 2, *extra) == 0
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert len(losses[0]) == STEPS
    # float32 sums of the same token losses in another order, logged to 6 decimals
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, atol=2e-6)
    # Each step's logged loss is the mean over the step's tokens: the micro-batches' sums over their count.
    a, b = (load(run / "adapter" / "adapter_model.safetensors") for run in (one, two))
    start = load(tiny_chat / "pissa_init" / "adapter_model.safetensors")
    scale = max(float(np.abs(x).max()) for x in a.values())
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    moved = max(float(np.abs(a[k].astype(np.float64) - start[k]).max()) for k in a)
    assert diff <= 1e-5 * scale and moved > 1e3 * diff, (diff, moved, scale)
