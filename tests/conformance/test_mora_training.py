"""`pissa train / eval / convert` on MoRA folders, on each backend: resume after Ctrl-C ends where
an uninterrupted run does, a NaN loss stops the run, the run folder holds a LoRA only where one is
exact (sharing), and that LoRA gives our MoRA model's logits in PEFT (torch) and in mlx-lm (MLX)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.peft import load_adapter
from tests.conftest import BACKENDS, DATA, PROMPT_IDS, interrupt_at, rel_max_diff

TRAINING = [b for b in BACKENDS if b != "numpy"]
FAST = ["--batch-size", "2", "--max-seq-len", "128", "--no-progress"]
RUN = ["--steps", "4", "--save-every", "2", "--lr", "1e-2"]


def train(backend, model, out, *extra) -> int:
    return main(["train", str(model), "--data", str(DATA / "train.jsonl"), "--out", str(out), *FAST,
                 "--backend", backend, *extra])


@pytest.fixture(scope="module")
def runs(tiny_mora, tmp_path_factory):
    """One 4-step run per (backend, MoRA type)."""
    out = {}
    for backend in TRAINING:
        for kind, model in tiny_mora.items():
            out[backend, kind] = tmp_path_factory.mktemp(f"{backend}-{kind}") / "run"
            assert train(backend, model, out[backend, kind], *RUN) == 0
    return out


@pytest.mark.parametrize("backend", TRAINING)
def test_run_folder_and_learning(backend, runs):
    for kind in ("sharing", "rotation"):
        run = runs[backend, kind]
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 4 and losses[-1] < losses[0], (kind, losses)
        trained = load_adapter(run / "adapter")
        assert trained.spec.kind == "mora" and trained.spec.option("mora_type") == kind and "shapes" in trained.info
        assert all(np.abs(M).max() > 0 for (M,) in trained.factors.values())
        assert (run / "lora").exists() == (kind == "sharing")


@pytest.mark.parametrize("backend", TRAINING)
def test_interrupt_and_resume_reproduce_the_run(backend, runs, tiny_mora, tmp_path, monkeypatch):
    out = tmp_path / "r"
    resume = interrupt_at(monkeypatch, 3)
    assert train(backend, tiny_mora["rotation"], out, *RUN) == 130
    assert (out / "checkpoints" / "step-000003" / "state.json").exists() and not (out / "adapter").exists()
    resume()
    assert train(backend, tiny_mora["rotation"], out, *RUN, "--resume") == 0
    a, b = load_adapter(out / "adapter"), load_adapter(runs[backend, "rotation"] / "adapter")
    for m, (M,) in b.factors.items():  # CPU training is deterministic
        np.testing.assert_allclose(a.factors[m][0], M, atol=1e-6)


@pytest.mark.parametrize("backend", TRAINING)
def test_nan_loss_stops_the_run(backend, tiny_mora, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = train(backend, tiny_mora["sharing"], out, "--steps", "4", "--save-every", "1", "--lr", "1e30",
               "--warmup-ratio", "0")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "the loss became nan at step" in err[-1] and "step-000001" in err[-1]


def test_an_adapter_of_another_init_is_refused(tiny_mora, runs, tmp_path, capsys):
    rc = train(TRAINING[0], tiny_mora["sharing"], tmp_path / "x", "--steps", "1",
               "--adapter", str(runs[TRAINING[0], "rotation"] / "adapter"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "was not trained from" in err[-1]


def mora_logits(backend, model_dir, adapter):
    if backend == "torch":
        import torch

        import pissa_torch

        model, _ = pissa_torch.load(model_dir, adapter)
        with torch.no_grad():
            return model(torch.tensor(PROMPT_IDS)).logits.numpy()
    import mlx.core as mx

    import pissa_mlx

    model, _ = pissa_mlx.load(model_dir, adapter)
    return np.array(model(mx.array(PROMPT_IDS)))


@pytest.mark.parametrize("backend", TRAINING)
def test_converted_sharing_adapter_serves_in_peft_and_mlx_lm(backend, runs, tiny_mora, tiny_chat_base, tmp_path):
    """The trained sharing adapter as a plain LoRA on the original model: PEFT (torch) and mlx-lm
    (MLX), the tools that serve it, give our MoRA model's logits within 1e-4 relative."""
    run = runs[backend, "sharing"]
    lora_dir = tmp_path / "lora"
    assert main(["convert", "--trained", str(run / "adapter"), "--out", str(lora_dir), "--format", "mlx-lm"]) == 0
    ours = mora_logits(backend, tiny_mora["sharing"], run / "adapter")
    if backend == "torch":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_chat_base, dtype=torch.float32)
        with torch.no_grad():
            plain = base(torch.tensor(PROMPT_IDS)).logits.numpy()
            theirs = PeftModel.from_pretrained(base, lora_dir).eval()(torch.tensor(PROMPT_IDS)).logits.numpy()
    else:
        import mlx.core as mx
        from mlx_lm import load

        model, _ = load(str(tiny_chat_base))
        plain = np.array(model(mx.array(PROMPT_IDS)))
        model, _ = load(str(tiny_chat_base), adapter_path=str(lora_dir / "mlx_lm"))
        theirs = np.array(model(mx.array(PROMPT_IDS)))
    assert rel_max_diff(theirs, ours) < 1e-4
    assert rel_max_diff(plain, ours) > 1e-3  # the adapter does change the model


@pytest.mark.parametrize("backend", TRAINING)
def test_eval_and_generate_on_a_mora_folder(backend, runs, tiny_mora, capsys):
    run = runs[backend, "rotation"]
    assert main(["eval", str(tiny_mora["rotation"]), "--adapter", str(run / "adapter"), "--data",
                 str(DATA / "eval.jsonl"), "--limit", "2", "--max-new-tokens", "4", "--backend", backend,
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 2 and np.isfinite(result["loss"])
    assert main(["generate", str(tiny_mora["rotation"]), "--adapter", str(run / "adapter"), "--prompt", "2+3?",
                 "--max-new-tokens", "3", "--backend", backend]) == 0
