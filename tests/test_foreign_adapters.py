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
from pissa.files.formats.peft import SIDECAR, load_adapter
from pissa.adapters.adapter import fingerprint
from tests.conftest import BACKENDS, DATA, write_tiny_llama

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


@pytest.fixture(scope="module")
def runs(peft_init, tmp_path_factory) -> dict[str, Path]:
    """A 2-step run per training backend, from the init PEFT wrote."""
    out = {}
    for backend in TRAINING:
        out[backend] = tmp_path_factory.mktemp(f"run-{backend}") / "run"
        assert train(backend, peft_init, out[backend]) == 0
    return out


@pytest.mark.parametrize("backend", TRAINING)
def test_training_starts_from_an_init_peft_wrote(backend, peft_init, runs, tmp_path):
    """It used to stop with a KeyError on the missing fingerprint (pissa.training.loop), and at the end the
    conversion refused an init without pissa's role."""
    run = runs[backend]
    want = fingerprint(load_adapter(peft_init / "pissa_init").factors)
    assert load_adapter(run / "adapter").info["init_fingerprint"] == want
    assert load_adapter(run / "lora").spec.rank == 8
    if backend == TRAINING[0]:  # --adapter: a run of this init continues (its fingerprint was computed)
        assert train(backend, peft_init, tmp_path / "again", "--adapter", str(run / "adapter")) == 0


def test_an_adapter_without_fingerprint_must_fit_the_init(peft_init, tiny_chat_base, tmp_path, capsys):
    """--adapter without a recorded init (e.g. trained with PEFT) is checked by its modules and shapes."""
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    run_init(str(tiny_chat_base), tmp_path / "rank2", AdapterSpec(rank=2), progress=False)
    other = tmp_path / "rank2" / "pissa_init"
    (other / SIDECAR).unlink()
    assert main(["train", str(peft_init), "--data", str(DATA / "train.jsonl"), "--out", str(tmp_path / "run"),
                 "--adapter", str(other), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err, err


# ------------------------------------------------------------- convert without a fingerprint
@pytest.fixture(scope="module")
def unmarked(runs, tmp_path_factory) -> Path:
    """A trained adapter as PEFT would save it: the run's adapter without pissa_config.json."""
    if not runs:
        pytest.skip("needs a training backend")
    out = tmp_path_factory.mktemp("unmarked") / "adapter"
    shutil.copytree(next(iter(runs.values())) / "adapter", out)
    (out / SIDECAR).unlink()
    return out


def other_init(folder: Path, **kwargs) -> Path:
    """pissa_init of a tiny model other than the one trained (kwargs: write_tiny_llama's, AdapterSpec's init)."""
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    init = kwargs.pop("init", "pissa")
    write_tiny_llama(folder / "base", vocab=49152, **kwargs)
    run_init(str(folder / "base"), folder / "init", AdapterSpec(rank=4, init=init), progress=False)
    return folder / "init" / "pissa_init"


def convert(initial: Path, trained: Path, out: Path) -> int:
    return main(["convert", "--initial", str(initial), "--trained", str(trained), "--out", str(out)])


def test_convert_without_fingerprint_accepts_the_init_it_was_trained_from(peft_init, unmarked, tmp_path):
    assert convert(peft_init / "pissa_init", unmarked, tmp_path / "lora") == 0
    assert load_adapter(tmp_path / "lora").spec.rank == 8


@pytest.mark.parametrize("case, words", [
    ("another model", "does not look trained from --initial"),
    ("LoRA's init of this model", "does not look trained from --initial"),
    ("another hidden size", "other shapes in 14 module(s)"),
])
def test_convert_without_fingerprint_refuses_another_init(case, words, tiny_chat_base, unmarked, tmp_path, capsys):
    """Without a fingerprint these converted silently into a LoRA that changes the model (the last
    one ended in a numpy traceback)."""
    if case == "another model":
        initial = other_init(tmp_path, seed=1)
    elif case == "another hidden size":
        initial = other_init(tmp_path, hidden=32, inter=64)
    else:
        from pissa.jobs.init import run_init
        from pissa.adapters.spec import AdapterSpec

        run_init(str(tiny_chat_base), tmp_path / "lora-init", AdapterSpec(rank=4, init="lora"), progress=False)
        initial = tmp_path / "lora-init" / "pissa_init"
    assert convert(initial, unmarked, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pissa: error: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_similarity_is_the_cosine_of_the_products_whatever_the_signs():
    from pissa.adapters.kinds.lora import similarity

    rng = np.random.default_rng(0)
    A0, B0 = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    A1, B1 = A0 + 0.3 * rng.standard_normal(A0.shape), B0 + 0.3 * rng.standard_normal(B0.shape)
    P0, P1 = B0 @ A0, B1 @ A1
    want = np.sum(P0 * P1) / np.linalg.norm(P0) / np.linalg.norm(P1)
    assert similarity((A0, B0), (A1, B1)) == pytest.approx(want, rel=1e-12)
    flip = np.array([1, -1, -1, 1.0])  # PEFT leaves the SVD's signs as LAPACK gives them
    assert similarity((A0 * flip[:, None], B0 * flip), (A1, B1)) == pytest.approx(want, rel=1e-12)
    zero = np.zeros_like(B0)  # LoRA's init: B0 = 0, so A is compared
    assert similarity((A0, zero), (A1, B1)) == pytest.approx(np.sum(A0 * A1) / np.linalg.norm(A0) / np.linalg.norm(A1))
