"""Dropout on the adapter's input (PEFT's lora_dropout), on both backends: `pissa train --dropout`
is written into the trained adapter's config, a PEFT init's lora_dropout is honoured, dropout acts
in training only, and a seeded run is reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.adapters.spec import AdapterSpec
from pissa.cli import main
from pissa.files.formats.peft import load_adapter
from pissa.files.formats.safetensors import load
from tests.conftest import BACKENDS, DATA

TRAINING = [b for b in BACKENDS if b != "numpy"]


def train(backend, model, out, *extra):
    return main(["train", str(model), "--data", str(DATA / "train.jsonl"), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--max-seq-len", "96", "--lr", "3e-3", "--no-progress", "--backend", backend,
                 *extra])


def layer_of(backend: str, p: float):
    """A PissaLinear with dropout p on a random 16x8 base, and an input."""
    rng = np.random.default_rng(0)
    W, A, B = rng.standard_normal((16, 8)), rng.standard_normal((4, 8)), rng.standard_normal((16, 4))
    x = rng.standard_normal((3, 8))
    spec = AdapterSpec(rank=4, dropout=p)
    if backend == "torch":
        import torch

        base = torch.nn.Linear(8, 16, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(W))
        from pissa_torch import PissaLinear

        layer = PissaLinear.from_params(base.float(), (torch.tensor(A).float(), torch.tensor(B).float()), spec)
        return layer, lambda: layer(torch.tensor(x).float()).detach().numpy()
    import mlx.core as mx
    from mlx import nn

    from pissa_mlx import PissaLinear

    base = nn.Linear(8, 16, bias=False)
    base.weight = mx.array(W.astype(np.float32))
    layer = PissaLinear.from_params(base, (mx.array(A.astype(np.float32)), mx.array(B.astype(np.float32))), spec)
    return layer, lambda: np.array(layer(mx.array(x.astype(np.float32))))


@pytest.mark.parametrize("backend", TRAINING)
def test_dropout_acts_in_training_only(backend):
    plain, plain_out = layer_of(backend, 0.0)
    layer, out = layer_of(backend, 0.5)
    layer.train()
    assert not np.allclose(out(), plain_out())        # half the adapter's inputs dropped (and the rest scaled)
    layer.eval()
    np.testing.assert_array_equal(out(), plain_out())  # eval: the layer is the plain one


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRAINING)
def test_train_dropout_is_seeded_and_written_for_peft(backend, tiny_chat, tmp_path):
    runs = {}
    for name, extra in (("a", ["--dropout", "0.1"]), ("b", ["--dropout", "0.1"]), ("none", [])):
        assert train(backend, tiny_chat, tmp_path / name, *extra) == 0
        runs[name] = load(tmp_path / name / "adapter" / "adapter_model.safetensors")
    for key in runs["a"]:
        np.testing.assert_array_equal(runs["a"][key], runs["b"][key])   # the same seed, the same masks
    assert any(not np.array_equal(runs["a"][k], runs["none"][k]) for k in runs["a"])
    cfg = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.1 and load_adapter(tmp_path / "a" / "adapter").spec.dropout == 0.1
    assert load_adapter(tmp_path / "none" / "adapter").spec.dropout == 0.0

    if backend == "torch":  # PEFT builds its dropout from the trained adapter's config
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat), tmp_path / "a" / "adapter")
        drops = [m.lora_dropout["default"] for m in peft.modules() if hasattr(m, "lora_dropout")]
        assert drops and all(isinstance(d, torch.nn.Dropout) and d.p == 0.1 for d in drops)


@pytest.mark.parametrize("backend", TRAINING)
def test_a_peft_init_with_lora_dropout_trains_with_it(backend, tiny_chat, tmp_path):
    """PEFT's lora_dropout of the init is honoured (it was read and ignored before)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_chat, model)
    cfg_path = model / "pissa_init" / "adapter_config.json"
    (model / "pissa_init" / "pissa_config.json").unlink()  # as PEFT writes it: no pissa_config.json
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_dropout": 0.2}))
    assert load_adapter(model / "pissa_init").spec.dropout == 0.2
    if backend == "torch":
        import torch
        from pissa_torch import backend as be, load

        loaded, _ = load(model)
        drops = [layer.dropout for _, layer in be.adapter_layers(loaded)]
        assert drops and all(isinstance(d, torch.nn.Dropout) and d.p == 0.2 for d in drops)
    else:
        from mlx import nn
        from pissa_mlx import backend as be, load

        loaded, _ = load(model)
        drops = [layer.dropout for _, layer in be.adapter_layers(loaded)]
        assert drops and all(isinstance(d, nn.Dropout) and abs(1 - d._p_1 - 0.2) < 1e-9 for d in drops)
    assert train(backend, model, tmp_path / "run", "--steps", "1") == 0
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.2
