"""`pissa train/convert/merge/eval --backend torch` on a tiny model with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pissa.cli import main  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.files.formats.safetensors import load  # noqa: E402
from tests.conftest import DATA, interrupt_at, rel_max_diff  # noqa: E402

FAST = ["--batch-size", "2", "--max-seq-len", "128", "--no-progress", "--backend", "torch"]


def train(model, out, *extra, data=DATA / "train.jsonl"):
    return main(["train", str(model), "--data", str(data), "--out", str(out), *FAST, *extra])


def one_line_error(capsys, rc, words):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("pissa: error: ") and words in err[-1], err
    return err[-1]


@pytest.fixture(scope="module")
def run(tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    rc = main(["train", str(tiny_chat), "--data", str(DATA / "train.jsonl"), "--eval-data", str(DATA / "eval.jsonl"),
               "--out", str(out), "--steps", "8", "--eval-every", "4", "--save-every", "4", "--lr", "3e-3", *FAST])
    assert rc == 0
    return out


def test_run_folder_has_everything(run):
    for rel in ("adapter/adapter_model.safetensors", "lora/adapter_config.json", "metrics.jsonl", "loss.png",
                "checkpoints/step-000004/state.json", "checkpoints/step-000008/optimizer.pt", "config.json"):
        assert (run / rel).exists(), rel
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(losses) == 8 and [r["step"] for r in evals] == [4, 8]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns
    assert all({"lr", "tokens_per_s"} <= set(r) for r in rows if "loss" in r)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    lora = load_adapter(run / "lora")
    assert lora.spec.rank == 8 and lora.spec.scale == load_adapter(run / "adapter").spec.scale


def test_interrupt_leaves_a_checkpoint_and_resume_reproduces_the_run(tiny_chat, tmp_path, monkeypatch, run):
    out = tmp_path / "r"
    args = ["--eval-data", str(DATA / "eval.jsonl"), "--steps", "8", "--eval-every", "4", "--save-every", "4",
            "--lr", "3e-3"]
    resume = interrupt_at(monkeypatch, 6)
    assert train(tiny_chat, out, *args) == 130
    assert (out / "checkpoints" / "step-000006" / "state.json").exists()
    assert not (out / "adapter").exists()
    resume()
    assert train(tiny_chat, out, *args, "--resume") == 0
    # CPU training is deterministic: the resumed run ends exactly where the uninterrupted one did.
    a, b = load(out / "adapter" / "adapter_model.safetensors"), load(run / "adapter" / "adapter_model.safetensors")
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
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
    ("empty", "\n\n", "is empty"),
    ("bad json", '{"text": "ok"}\n{"text": oops}\n', "train.jsonl:2: invalid JSON"),
    ("no fields", '{"text": "ok"}\n{"question": "2+2"}\n', "train.jsonl:2: a record needs 'text'"),
    ("last not assistant", '{"messages": [{"role": "user", "content": "hi"}]}\n', "must be the assistant's"),
])
def test_bad_data(tiny_chat, tmp_path, capsys, case, content, words):
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    rc = train(tiny_chat, tmp_path / "out", "--steps", "1", data=data)
    one_line_error(capsys, rc, words)
    assert not (tmp_path / "out").exists()


def test_messages_without_a_chat_template(tiny_chat, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_chat, model)
    (model / "chat_template.jinja").unlink()
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    rc = train(model, tmp_path / "out", "--steps", "1")
    one_line_error(capsys, rc, "train.jsonl:1: 'messages' data needs a chat template")


def test_long_sequences_are_cut_and_counted(tiny_chat, tmp_path, capsys):
    rc = train(tiny_chat, tmp_path / "out", "--steps", "1", "--max-seq-len", "100")
    assert rc == 0
    err = capsys.readouterr().err
    assert "records in" in err and "were cut to --max-seq-len 100" in err


def test_non_empty_run_folder_needs_resume_or_force(tiny_chat, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    one_line_error(capsys, train(tiny_chat, out, "--steps", "1"), "pass --resume")
    one_line_error(capsys, train(tiny_chat, tmp_path / "fresh", "--steps", "1", "--resume"), "no checkpoint")


def test_convert_refuses_an_adapter_from_another_init(run, tiny_chat, tmp_path, capsys, smollm2_tokenizer_dir):
    from pissa.jobs.init import run_init
    from pissa.files.loaders.hf import HFSource
    from pissa.adapters.spec import AdapterSpec

    other = tmp_path / "other"
    run_init(str(HFSource(tiny_chat).path), other, AdapterSpec(rank=4, init="pissa-fast", seed=3), progress=False)
    rc = main(["convert", "--initial", str(other / "pissa_init"), "--trained", str(run / "adapter"),
               "--out", str(tmp_path / "lora")])
    one_line_error(capsys, rc, "started from a different init")
    assert not (tmp_path / "lora").exists()
    rc = main(["convert", "--initial", str(tiny_chat / "pissa_init"), "--trained", str(run / "adapter"),
               "--out", str(tmp_path / "lora")])
    assert rc == 0 and (tmp_path / "lora" / "adapter_model.safetensors").exists()


def test_merge_gives_the_adapter_models_logits(run, tiny_chat, tmp_path):
    from transformers import AutoModelForCausalLM

    from pissa_torch import load as load_model

    ids = torch.tensor([[1, 504, 2722, 5253, 28, 1041, 429, 253]])
    model, _ = load_model(tiny_chat, run / "adapter")
    assert main(["merge", str(tiny_chat), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert rel_max_diff(merged(ids).logits.numpy(), model(ids).logits.numpy()) < 1e-5


def test_eval_reports_accuracy_and_loss(run, tiny_chat, capsys):
    rc = main(["eval", str(tiny_chat), "--adapter", str(run / "adapter"), "--data", str(DATA / "eval.jsonl"),
               "--limit", "4", "--max-new-tokens", "8", "--backend", "torch", "--no-progress"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1 and np.isfinite(result["loss"])


def test_generate_prints_one_answer(run, tiny_chat, capsys):
    rc = main(["generate", str(tiny_chat), "--adapter", str(run / "adapter"), "--prompt", "What is 2 + 3?",
               "--max-new-tokens", "5", "--backend", "torch"])
    assert rc == 0 and capsys.readouterr().out.strip()


def test_gradient_checkpointing_gives_the_same_step(tiny_chat, tmp_path):
    """Recomputing activations must not change the math: one step with and without it."""
    args = ["--steps", "2", "--lr", "3e-3", "--warmup-ratio", "0"]
    assert train(tiny_chat, tmp_path / "plain", *args) == 0
    assert train(tiny_chat, tmp_path / "ckpt", *args, "--grad-checkpointing") == 0
    a = load(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
