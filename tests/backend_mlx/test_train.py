"""`pissa train/merge/eval/generate --backend mlx` on a tiny model with SmolLM2's tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from pissa.cli import main  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.files.formats.safetensors import load  # noqa: E402
from tests.backend_mlx.conftest import RUN, run_cli  # noqa: E402
from tests.conftest import DATA, PROMPT_IDS, interrupt_at, rel_max_diff  # noqa: E402


def train(model, out, *extra, data=DATA / "train.jsonl"):
    return run_cli("mlx", model, out, *extra, data=data)


def one_line_error(capsys, rc, words):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("pissa: error: ") and words in err[-1], err
    return err[-1]


def adapters_close(a_dir, b_dir, atol=1e-6) -> bool:
    a, b = load(a_dir / "adapter_model.safetensors"), load(b_dir / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=atol) for k in a)


def test_run_folder_has_everything(mlx_run):
    for rel in ("adapter/adapter_model.safetensors", "lora/adapter_config.json", "metrics.jsonl", "loss.png",
                "checkpoints/step-000004/state.json", "checkpoints/step-000008/optimizer.safetensors",
                "config.json"):
        assert (mlx_run / rel).exists(), rel
    rows = [json.loads(line) for line in (mlx_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(losses) == 8 and [r["step"] for r in evals] == [4, 8]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns
    assert all({"lr", "tokens_per_s"} <= set(r) for r in rows if "loss" in r)
    assert (mlx_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((mlx_run / "config.json").read_text())["backend"] == "mlx"
    lora = load_adapter(mlx_run / "lora")
    assert lora.spec.rank == 8 and lora.spec.scale == load_adapter(mlx_run / "adapter").spec.scale


def test_interrupt_leaves_a_checkpoint_and_resume_reproduces_the_run(tiny_chat, tmp_path, monkeypatch, mlx_run,
                                                                     small_eval):
    out = tmp_path / "r"
    args = ["--eval-data", str(small_eval), *RUN]
    resume = interrupt_at(monkeypatch, 6)
    assert train(tiny_chat, out, *args) == 130
    assert (out / "checkpoints" / "step-000006" / "optimizer.safetensors").exists()
    assert not (out / "adapter").exists()
    resume()
    assert train(tiny_chat, out, *args, "--resume") == 0
    # CPU training is deterministic: the resumed run (adapter and AdamW state restored) ends
    # exactly where the uninterrupted one did.
    assert adapters_close(out / "adapter", mlx_run / "adapter")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_chat, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = train(tiny_chat, out, "--steps", "6", "--save-every", "1", "--lr", "1e30", "--warmup-ratio", "0")
    line = one_line_error(capsys, rc, "the loss became nan at step")
    good = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert good and good[-1] in line
    for ckpt in (out / "checkpoints").iterdir():
        a = load(ckpt / "adapter" / "adapter_model.safetensors")
        assert all(np.isfinite(v.astype(np.float32)).all() for v in a.values()), ckpt


@pytest.mark.parametrize("case, content, words", [
    ("missing", None, "not found"),
    ("bad json", '{"text": "ok"}\n{"text": oops}\n', "train.jsonl:2: invalid JSON"),
])
def test_bad_data(tiny_chat, tmp_path, capsys, case, content, words):
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    rc = train(tiny_chat, tmp_path / "out", "--steps", "1", data=data)
    one_line_error(capsys, rc, words)
    assert not (tmp_path / "out").exists()


def test_non_empty_run_folder_needs_resume_or_force(tiny_chat, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    one_line_error(capsys, train(tiny_chat, out, "--steps", "1"), "pass --resume")
    one_line_error(capsys, train(tiny_chat, tmp_path / "fresh", "--steps", "1", "--resume"), "no checkpoint")
    one_line_error(capsys, train(tiny_chat, tmp_path / "dev", "--steps", "1", "--device", "cuda"), "not an MLX device")


def test_grad_checkpointing_and_accumulation_give_the_same_steps(tiny_chat, tmp_path):
    args = ["--steps", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup-ratio", "0"]
    assert train(tiny_chat, tmp_path / "plain", *args) == 0
    assert train(tiny_chat, tmp_path / "ckpt", *args, "--grad-checkpointing") == 0
    assert adapters_close(tmp_path / "plain" / "adapter", tmp_path / "ckpt" / "adapter")
    assert not adapters_close(tmp_path / "plain" / "adapter", tiny_chat / "pissa_init")  # it trained


def test_bf16_frozen_weights_train(tiny_chat, tmp_path):
    # Short records: MLX's bfloat16 matmuls on the CPU are slow (no BLAS), 10x fp32 here.
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(8)))
    assert train(tiny_chat, tmp_path / "bf16", "--steps", "1", "--precision", "bf16", "--max-seq-len", "16",
                 data=data) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    a = load(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in a.values())


def test_merge_gives_the_adapter_models_logits(mlx_run, tiny_chat, tmp_path):
    from pissa_mlx import load as load_model
    from pissa_mlx.backend import load_base

    ids = mx.array(PROMPT_IDS)
    model, _ = load_model(tiny_chat, mlx_run / "adapter")
    assert main(["merge", str(tiny_chat), "--adapter", str(mlx_run / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = load_base(tmp_path / "m")
    assert rel_max_diff(np.array(merged(ids)), np.array(model(ids))) < 1e-5


def test_eval_and_generate(mlx_run, tiny_chat, capsys):
    rc = main(["eval", str(tiny_chat), "--adapter", str(mlx_run / "adapter"), "--data", str(DATA / "eval.jsonl"),
               "--limit", "4", "--max-new-tokens", "8", "--backend", "mlx", "--no-progress"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1 and np.isfinite(result["loss"])
    rc = main(["generate", str(tiny_chat), "--adapter", str(mlx_run / "adapter"), "--prompt", "2+2?",
               "--max-new-tokens", "4", "--backend", "mlx"])
    assert rc == 0 and capsys.readouterr().out.strip()


def test_cross_entropy_matches_float64_numpy():
    """The fused loss (value and gradient, masked positions included) against the textbook
    formula in float64, and against MLX's own nn.losses.cross_entropy."""
    from mlx import nn
    from pissa_mlx.loss import cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (2, 5, 300)).astype(np.float32)
    targets = rng.integers(0, 300, (2, 5)).astype(np.int32)
    weights = rng.uniform(0, 1, (2, 5)).astype(np.float32) * (rng.uniform(size=(2, 5)) > 0.3)

    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    want = lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    p = np.exp(x - lse[..., None])
    grad_want = (p - np.eye(300)[targets]) * weights[..., None]

    def loss(z, ce):
        return (ce(z) * mx.array(weights)).sum()

    ours = lambda z: cross_entropy(z, mx.array(targets))[0]  # noqa: E731
    mlx_ref = lambda z: nn.losses.cross_entropy(z, mx.array(targets))  # noqa: E731
    np.testing.assert_allclose(np.array(ours(mx.array(logits))), want, rtol=1e-6, atol=1e-5)
    for ce in (ours, mlx_ref):
        grad = np.array(mx.compile(mx.grad(lambda z: loss(z, ce)))(mx.array(logits)))
        np.testing.assert_allclose(grad, grad_want, atol=1e-6)
