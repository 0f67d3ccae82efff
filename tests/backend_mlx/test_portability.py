"""Adapters move between the torch and MLX backends unchanged (issue 4, "Portability"):
the same run gives the same adapter on both, an adapter trained on one gives the same logits on
the other (float32, within 1e-4 relative), and training continues on the other backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.files.formats.safetensors import load  # noqa: E402
from tests.backend_mlx.conftest import run_cli  # noqa: E402
from tests.conftest import PROMPT_IDS, rel_max_diff  # noqa: E402


def mlx_logits(model_dir, adapter_dir):
    import pissa_mlx

    model, _ = pissa_mlx.load(model_dir, adapter_dir)
    return np.array(model(mx.array(PROMPT_IDS)))


def torch_logits(model_dir, adapter_dir):
    import pissa_torch

    model, _ = pissa_torch.load(model_dir, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor(PROMPT_IDS)).logits.numpy()


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return np.array([r.get("loss", r.get("eval_loss")) for r in rows(run)])


def test_the_same_run_on_both_backends_ends_at_the_same_adapter(mlx_run, torch_run, tiny_chat):
    # Same data order, schedule, loss, AdamW (with bias correction) and clipping. Measured over
    # 8 steps at lr 3e-3: losses agree to 2e-6, adapters to 4e-5 of how far training moved them.
    # Both pack: the same records in the same rows, so the same tokens at every step.
    for run in (mlx_run, torch_run):
        assert json.loads((run / "config.json").read_text())["batching"] == "packed"
    tokens = [[r["tokens"] for r in rows(run) if "tokens" in r] for run in (mlx_run, torch_run)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8
    np.testing.assert_allclose(losses(mlx_run), losses(torch_run), rtol=1e-4)
    a = load(mlx_run / "adapter" / "adapter_model.safetensors")
    b = load(torch_run / "adapter" / "adapter_model.safetensors")
    init = load(tiny_chat / "pissa_init" / "adapter_model.safetensors")
    for k in b:
        moved = np.abs(b[k] - init[k]).max()
        assert moved > 0 and np.abs(a[k] - b[k]).max() <= 1e-3 * moved, k


@pytest.mark.parametrize("trained_on", ["torch", "mlx"])
def test_an_adapter_gives_the_same_logits_on_the_other_backend(trained_on, mlx_run, torch_run, tiny_chat):
    run = {"torch": torch_run, "mlx": mlx_run}[trained_on]
    ours, theirs = mlx_logits(tiny_chat, run / "adapter"), torch_logits(tiny_chat, run / "adapter")
    assert rel_max_diff(ours, theirs) < 1e-4
    assert rel_max_diff(theirs, torch_logits(tiny_chat, None)) > 1e-3  # training changed the model


@pytest.mark.parametrize("trained_on, continued_on", [("torch", "mlx"), ("mlx", "torch")])
def test_training_continues_on_the_other_backend(trained_on, continued_on, mlx_run, torch_run, tiny_chat, tmp_path):
    run = {"torch": torch_run, "mlx": mlx_run}[trained_on]
    out = tmp_path / "more"
    assert run_cli(continued_on, tiny_chat, out, "--adapter", str(run / "adapter"), "--steps", "2",
                   "--lr", "1e-3") == 0
    more = load_adapter(out / "adapter")
    assert more.info["init_fingerprint"] == load_adapter(tiny_chat / "pissa_init").info["fingerprint"]
    assert json.loads((out / "config.json").read_text())["backend"] == continued_on
    before = load_adapter(run / "adapter")
    assert any(not np.array_equal(more.factors[m][0], before.factors[m][0]) for m in more.factors)
    assert (out / "lora" / "adapter_model.safetensors").exists()


def test_the_portability_script(torch_run, tiny_chat, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "portability_check.py"
    spec = importlib.util.spec_from_file_location("portability_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    adapter = str(torch_run / "adapter")
    assert script.main(["local", str(tiny_chat), "--adapter", adapter]) == 0
    assert capsys.readouterr().out.startswith("PORTABLE: mlx vs torch, 3 prompts")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert script.main(["dump", str(tiny_chat), "--adapter", adapter, "--backend", "mlx", "--out", str(a)]) == 0
    assert script.main(["dump", str(tiny_chat), "--backend", "torch", "--out", str(b)]) == 0  # the init adapter
    capsys.readouterr()
    assert script.main(["compare", str(a), str(b)]) == 1
    assert capsys.readouterr().out.startswith("NOT PORTABLE")
