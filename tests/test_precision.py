"""Frozen weights in the compute dtype, trainable ones in float32 master weights, on both
backends (PEFT's autocast_adapter_dtype; mlx-lm's bf16 models): under bf16 precision the frozen
parameters are bfloat16 from the moment they load, the adapter's (and full fine-tuning's target
weights) float32, and the numbers stay within what bfloat16 allows of the float32 path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.cli import main
from pissa.training.data import collate, load_dataset
from pissa.files.tokenizer import load_tokenizer
from tests.conftest import BACKENDS, DATA

TRAINING = [b for b in BACKENDS if b != "numpy"]
# bfloat16 keeps 8 significant bits (relative rounding up to 2^-9 = 2e-3 per value, per weight
# and per activation); through the tiny model's two blocks and its 49k-way head the logits then
# move by several of those. Measured on tiny_chat (max |difference| / max |logit|): torch
# 1.24e-2, MLX 1.28e-2; the bound leaves 2.5x.
LOGITS_REL = 3e-2
# 12 training steps at lr 1e-2, bf16 against fp32: the loss curves, as changes from the first
# step's loss, apart by at most this fraction of the float32 run's whole drop (0.030). Measured:
# torch 2.1e-3, MLX 4.1e-3; the bound leaves 2.5x. (The adapters themselves end far apart entrywise:
# Adam moves every entry by about the learning rate whatever its gradient's size, so on this
# random model, whose gradients are tiny, bf16's rounding flips the direction of many entries;
# the function they compute, which the loss measures, agrees.)
CURVE_REL = 1e-2


def loaded(backend: str, folder, precision: str):
    import importlib

    module = importlib.import_module(f"pissa_{backend}")
    return module.load(folder, precision=precision)[0], importlib.import_module(f"pissa_{backend}.backend")


@pytest.mark.parametrize("backend", TRAINING)
def test_bf16_loads_frozen_weights_in_bf16_and_the_adapter_in_float32(backend, tiny_chat, tmp_path):
    model, be = loaded(backend, tiny_chat, "bf16")
    if backend == "torch":
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        import torch

        assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    else:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        names = {k for k, _ in tree_flatten(model.trainable_parameters())}
        frozen = {v.dtype for k, v in tree_flatten(model.parameters()) if k not in names}
        trainable = {v.dtype for _, v in tree_flatten(model.trainable_parameters())}
        assert frozen == {mx.bfloat16} and trainable == {mx.float32}
    # Full fine-tuning: its target weights are the trainable ones, float32 master weights too.
    full = tmp_path / "full"
    assert main(["init", str(tiny_chat.parent / "base"), "--out", str(full), "--kind", "full", "--no-progress"]) == 0
    model, _ = loaded(backend, full, "bf16")
    if backend == "torch":
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    else:
        assert {v.dtype for _, v in tree_flatten(model.trainable_parameters())} == {mx.float32}


@pytest.mark.parametrize("backend", TRAINING)
def test_bf16_logits_are_the_float32_ones_to_bf16_precision(backend, tiny_chat):
    tokenizer = load_tokenizer(tiny_chat)
    batch = collate(load_dataset(DATA / "eval.jsonl", tokenizer, 96).examples[:4], tokenizer.eos_token_id)
    out = {}
    for precision in ("fp32", "bf16"):
        model, be = loaded(backend, tiny_chat, precision)
        model.eval()
        out[precision] = np.asarray(be.to_numpy(be.logits(model, batch, precision)), dtype=np.float64)
    rel = np.abs(out["bf16"] - out["fp32"]).max() / np.abs(out["fp32"]).max()
    print(f"{backend}: bf16 logits differ from fp32 by {rel:.2e} relative")
    assert 0 < rel < LOGITS_REL


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRAINING)
def test_bf16_training_follows_the_float32_curve(backend, tiny_chat, tmp_path, capsys):
    curves = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        assert main(["train", str(tiny_chat), "--data", str(DATA / "train.jsonl"), "--out", str(run), "--steps", "12",
                     "--batch-size", "2", "--max-seq-len", "96", "--lr", "1e-2", "--precision", precision,
                     "--backend", backend, "--no-progress"]) == 0
        config = json.loads((run / "config.json").read_text())
        assert config["precision"] == precision
        # on a CPU, bf16 says what it costs there
        on_cpu = "cpu" in config["device"].lower()
        assert ("many times slower" in capsys.readouterr().err) == (precision == "bf16" and on_cpu), config["device"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = np.array([r["loss"] for r in rows if "loss" in r])
        curves[precision] = losses - losses[0]
    drop = -curves["fp32"][-1]
    apart = np.abs(curves["bf16"] - curves["fp32"]).max()
    print(f"{backend}: the loss drops by {drop:.4f}; the bf16 curve is {apart / drop:.2e} of that from the fp32 one")
    assert drop > 0 and 0 < apart < CURVE_REL * drop
