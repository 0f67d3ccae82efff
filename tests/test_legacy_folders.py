"""Folders written before kind and init were two axes (tests/fixtures/legacy, README there) still
load on both backends to the logits the old code computed, and still convert and merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.peft import load_adapter
from tests.conftest import BACKENDS, rel_max_diff

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
EXPECTED = np.load(LEGACY / "expected_logits.npz")
KINDS = ("pissa", "mora", "full")
TRAINING = [b for b in BACKENDS if b != "numpy"]


def torch_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(EXPECTED["ids"])).logits.numpy()


def logits(backend: str, folder: Path, adapter: Path | None) -> np.ndarray:
    if backend == "torch":
        import pissa_torch

        return torch_logits(pissa_torch.load(folder, adapter)[0])
    import mlx.core as mx
    import pissa_mlx

    model, _ = pissa_mlx.load(folder, adapter)
    return np.array(model(mx.array(EXPECTED["ids"])).astype(mx.float32))


def test_the_old_specs_read_as_the_new_axes():
    want = {"pissa": ("lora", "pissa", {}), "mora": ("mora", None, {"mora_type": "sharing"}), "full": ("full", None, {})}
    for kind, (name, init, options) in want.items():
        for sub in ("pissa_init", "trained"):
            spec = load_adapter(LEGACY / kind / sub).spec
            assert (spec.kind, spec.init, dict(spec.options)) == (name, init, options)
            assert "kind" not in json.loads((LEGACY / kind / sub / "pissa_config.json").read_text())["spec"]


@pytest.mark.parametrize("backend", TRAINING)
@pytest.mark.parametrize("kind", KINDS)
def test_old_folders_load_to_the_old_logits(backend, kind):
    for which, adapter in (("init", None), ("trained", LEGACY / kind / "trained")):
        got = logits(backend, LEGACY / kind, adapter)
        assert rel_max_diff(got, EXPECTED[f"{kind}_{which}"]) < 2e-6, (kind, which)


@pytest.mark.parametrize("kind", KINDS)
def test_old_folders_merge_and_convert(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    assert main(["merge", str(LEGACY / kind), "--adapter", str(LEGACY / kind / "trained"), "--out", str(merged)]) == 0
    assert rel_max_diff(torch_logits(AutoModelForCausalLM.from_pretrained(merged)), EXPECTED[f"{kind}_trained"]) < 2e-6

    lora = tmp_path / "lora"
    initial = ["--initial", str(LEGACY / kind / "pissa_init")] if kind == "pissa" else []
    code = main(["convert", *initial, "--trained", str(LEGACY / kind / "trained"), "--out", str(lora)])
    if kind == "full":
        assert code == 2 and not lora.exists()
        return
    from peft import PeftModel

    assert code == 0
    original = tmp_path / "original"
    shutil.copytree(LEGACY / "original", original)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original), lora)
    assert rel_max_diff(torch_logits(model), EXPECTED[f"{kind}_trained"]) < 1e-5
