"""Adapters pissa did not write: a pissa_init made by PEFT the way the official PiSSA scripts make
one (no pissa_config.json, hence no fingerprint), and trained adapters without a fingerprint.
Training starts from such an init on both backends, and `pissa convert` checks what it can compare
without a fingerprint: the modules, the shapes, and where the trained product s*B'A' points."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pissa.cli import main
from pissa.formats.peft import SIDECAR, load_adapter
from pissa.init import fingerprint
from tests.conftest import BACKENDS, DATA

TRAINING = [b for b in BACKENDS if b != "numpy"]
FAST = ["--batch-size", "2", "--max-seq-len", "128", "--no-progress"]


@pytest.fixture(scope="module")
def peft_init(tiny_chat_base, tmp_path_factory) -> Path:
    """OUT/ (the residual model) and OUT/pissa_init/ (init_lora_weights true), written by PEFT as
    the official PiSSA scripts do: get_peft_model with init_lora_weights="pissa", the config set
    back to true before saving, then the unloaded residual model saved beside it."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("peft_init") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="pissa", target_modules="all-linear",
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(out / "pissa_init")
    peft_model.unload().save_pretrained(out)
    for f in tiny_chat_base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
            shutil.copy(f, out / f.name)
    assert not (out / "pissa_init" / SIDECAR).exists()
    return out


def train(backend: str, model: Path, out: Path, *extra: str) -> int:
    return main(["train", str(model), "--data", str(DATA / "train.jsonl"), "--out", str(out), *FAST,
                 "--backend", backend, "--steps", "2", *extra])


@pytest.mark.parametrize("backend", TRAINING)
def test_training_starts_from_an_init_peft_wrote(backend, peft_init, tmp_path):
    """It used to stop with a KeyError on the missing fingerprint (pissa.loop), and at the end the
    conversion refused an init without pissa's role."""
    assert train(backend, peft_init, tmp_path / "run") == 0
    want = fingerprint(load_adapter(peft_init / "pissa_init").factors)
    assert load_adapter(tmp_path / "run" / "adapter").info["init_fingerprint"] == want
    assert load_adapter(tmp_path / "run" / "lora").spec.rank == 8
    # --adapter: a run of this init continues; one of another init (other shapes) is refused.
    assert train(backend, peft_init, tmp_path / "again", "--adapter", str(tmp_path / "run" / "adapter")) == 0


def test_an_adapter_without_fingerprint_must_fit_the_init(peft_init, tiny_chat_base, tmp_path, capsys):
    """--adapter without a recorded init (e.g. trained with PEFT) is checked by its modules and shapes."""
    from pissa.init import run_init
    from pissa.spec import AdapterSpec

    run_init(str(tiny_chat_base), tmp_path / "rank2", AdapterSpec(rank=2), progress=False)
    other = tmp_path / "rank2" / "pissa_init"
    (other / SIDECAR).unlink()
    assert main(["train", str(peft_init), "--data", str(DATA / "train.jsonl"), "--out", str(tmp_path / "run"),
                 "--adapter", str(other), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err, err
