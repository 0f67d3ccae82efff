"""Nothing is lost on resume, whatever the storage dtype: checkpoints keep the float32 master
weights and every state the step needs (optimizer, fp16's loss scaler, the dropout's random
state), a run killed with SIGKILL after a checkpoint and resumed ends bit for bit where an
uninterrupted one does, and only the newest --keep-checkpoints checkpoints stay on disk."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.safetensors import load
from tests.conftest import BACKENDS, DATA

TRAINING = [b for b in BACKENDS if b != "numpy"]


@pytest.fixture(scope="module")
def bf16_init(tiny_chat_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "init"
    assert main(["init", str(tiny_chat_base), "--out", str(out), "--rank", "4", "--dtype", "bfloat16",
                 "--no-progress"]) == 0
    return out


def args(backend, model, out, *extra):
    return ["train", str(model), "--data", str(DATA / "train.jsonl"), "--out", str(out), "--steps", "6",
            "--save-every", "2", "--batch-size", "2", "--max-seq-len", "96", "--lr", "3e-3", "--backend", backend,
            "--no-progress", *extra]


def killed_at(step: int, argv: list[str]) -> int:
    """Run `pissa train` in a child that SIGKILLs itself as it starts step `step` (0-based): no
    Ctrl-C handler, no final save, as when a machine's job is killed."""
    code = textwrap.dedent(f"""
        import os, signal
        import pissa.training.loop as loop
        real = loop.lr_at
        def lr_at(at, cfg):
            if at == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(at, cfg)
        loop.lr_at = lr_at
        from pissa.cli import main
        raise SystemExit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRAINING)
def test_a_bf16_run_killed_after_a_checkpoint_resumes_bit_for_bit(backend, bf16_init, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(backend, bf16_init, straight)) == 0
    assert killed_at(3, args(backend, bf16_init, killed)) == -9          # after the step-2 checkpoint
    assert not (killed / "adapter").exists()
    checkpoint = load(killed / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert {a.dtype.name for a in checkpoint.values()} == {"float32"}  # the master weights, not bf16
    assert main(args(backend, bf16_init, killed, "--resume")) == 0
    a = load(straight / "adapter" / "adapter_model.safetensors")
    b = load(killed / "adapter" / "adapter_model.safetensors")
    assert {x.dtype.name for x in a.values()} == {"bfloat16"}           # RUN_DIR/adapter: the storage dtype
    for key in a:
        np.testing.assert_array_equal(a[key].view(np.uint16), b[key].view(np.uint16), err_msg=key)


def test_fp16_resume_restores_the_loss_scaler(tiny_chat, tmp_path):
    """GradScaler's state (scale, growth tracker) travels in the checkpoint: a resumed fp16 run's
    scaler is the uninterrupted run's, not a fresh one."""
    torch = pytest.importorskip("torch")
    extra = ["--precision", "fp16", "--steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args("torch", tiny_chat, straight, *extra)) == 0
    assert killed_at(3, args("torch", tiny_chat, resumed, *extra)) == -9
    assert main(args("torch", tiny_chat, resumed, *extra, "--resume")) == 0

    def scaler(run):
        return torch.load(run / "checkpoints" / "step-000004" / "trainer.pt", weights_only=False)["scaler"]

    assert scaler(straight)["_growth_tracker"] == 4 and scaler(resumed) == scaler(straight)
    a = load(straight / "adapter" / "adapter_model.safetensors")
    b = load(resumed / "adapter" / "adapter_model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_only_the_newest_checkpoints_stay(tiny_chat, tmp_path):
    def steps_of(run):
        return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))

    # 7 steps, every 2: checkpoints 2, 4, 6; the final step is not one, and RUN_DIR/adapter holds it.
    assert main(args("torch", tiny_chat, tmp_path / "a", "--steps", "7")) == 0
    assert steps_of(tmp_path / "a") == [4, 6] and (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
    assert main(args("torch", tiny_chat, tmp_path / "b", "--steps", "7", "--keep-checkpoints", "0")) == 0
    assert steps_of(tmp_path / "b") == [2, 4, 6]
    assert main(args("torch", tiny_chat, tmp_path / "c", "--steps", "7", "--save-every", "0", "--save-at", "3,7",
                     "--keep-checkpoints", "1")) == 0
    assert steps_of(tmp_path / "c") == [7]
    state = json.loads((tmp_path / "c" / "checkpoints" / "step-000007" / "state.json").read_text())
    assert state["step"] == 7


@pytest.fixture(scope="module")
def finished(tiny_chat, tmp_path_factory):
    """A 2-step run with a checkpoint at each step, and its data file copied beside it."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "train.jsonl"
    data.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    run = root / "run"
    assert main(shaped(tiny_chat, data, run)) == 0
    return tiny_chat, data, run


def shaped(model, data, out, *extra):
    return ["train", str(model), "--data", str(data), "--out", str(out), "--steps", "2", "--save-every", "1",
            "--batch-size", "2", "--max-seq-len", "256", "--backend", "torch", "--no-progress", *extra]


@pytest.mark.parametrize("change, named", [
    (["--lr", "3e-4"], "--lr 0.0001 (now 0.0003)"),
    (["--batch-size", "4"], "--batch-size 2 (now 4)"),
    (["--grad-accum", "2"], "--grad-accum 1 (now 2)"),
    (["--max-seq-len", "320"], "--max-seq-len 256 (now 320)"),
    (["--seed", "1"], "--seed 0 (now 1)"),
    (["--no-packing"], "--packing on (now off)"),
    (["--precision", "fp16"], "--precision fp32 (now fp16)"),
    (["--dropout", "0.1"], "--dropout 0.0 (now 0.1)"),
    (["--warmup-ratio", "0.5"], "--warmup-ratio 0.03 (now 0.5)"),
    (["--steps", "4"], "--steps 2 (now 4)"),
    (["--epochs", "1", "--steps", "2"], "--epochs unset (now 1)"),
    ("other data", "--data "),
    ("edited data", "--data's contents (the file changed)"),
    ("other init", "the init (MODEL_DIR/pissa_init)"),
])
def test_a_resume_with_other_options_is_refused_in_one_line(finished, change, named, tmp_path, capsys):
    """Each option that shapes the run, changed on --resume: exit 2, one line naming it (and what it
    was), and the run folder exactly as it was."""
    model, data, run = finished
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    extra = change if isinstance(change, list) else []
    if change == "other data":
        data = tmp_path / "copy.jsonl"
        data.write_text(finished[1].read_text())
    elif change == "edited data":
        saved = data.read_text()
        data.write_text(saved + saved.splitlines(keepends=True)[0])
    elif change == "other init":
        model = tmp_path / "other"
        assert main(["init", str(finished[0].parent / "base"), "--out", str(model), "--rank", "4", "--init", "lora",
                     "--no-progress"]) == 0
    capsys.readouterr()
    try:
        assert main(shaped(model, data, run, "--resume", *extra)) == 2
    finally:
        if change == "edited data":
            data.write_text(saved)
    err = capsys.readouterr().err.strip().splitlines()  # a note (fp16 on a CPU) may come first
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert errors == err[-1:] and err[-1].startswith("pissa: error: --resume continues the run") and named in err[-1], err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resume_with_the_same_options_and_other_cadence_goes_on(finished, capsys):
    """Options that do not shape the run (eval and save cadence, checkpoints kept, gradient
    checkpointing) may change on --resume; the finished run then has nothing left to do."""
    model, data, run = finished
    assert main(shaped(model, data, run, "--resume", "--keep-checkpoints", "1", "--grad-checkpointing")) == 0
    assert "2 steps" in capsys.readouterr().out
