"""The torch backend against PEFT, on the real SmolLM2-135M weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from pissa.adapters.inits import decompose  # noqa: E402
from pissa.jobs.init import ADAPTER_DIR, run_init  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from pissa_torch.ops import make_ops  # noqa: E402
from tests.conformance import tolerances as tol  # noqa: E402
from tests.conftest import DATA, PROMPT_IDS, rel_max_diff  # noqa: E402

pytestmark = pytest.mark.slow
LAYERS = r"model\.layers\.(0|15|29)\..*_proj"


def canonical(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our sign rule applied to someone else's factors: largest-|.| entry of each B column > 0."""
    rows = np.abs(B).argmax(axis=0)
    s = np.sign(B[rows, np.arange(B.shape[1])])
    s[s == 0] = 1
    return A * s[:, None], B * s


@pytest.fixture(scope="module")
def peft_pissa(hf_smollm2):
    """PEFT's own PiSSA init (full SVD, float32) of 21 SmolLM2 matrices: module -> (A, B, W_res)."""
    cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=LAYERS, init_lora_weights="pissa")
    model = peft.get_peft_model(copy.deepcopy(hf_smollm2), cfg)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (module.lora_A["default"].weight.detach().double().numpy(),
                        module.lora_B["default"].weight.detach().double().numpy(),
                        module.get_base_layer().weight.detach().double().numpy())
    assert len(out) == 21
    return out


@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_full_svd_init_equals_peft(peft_pissa, smollm2, compute):
    ops = make_ops("cpu")
    spec = AdapterSpec(rank=16, init="pissa", compute_dtype=compute)
    for module, (pa, pb, pres) in peft_pissa.items():
        W = smollm2.get(module + ".weight")
        ours = decompose(W, module, spec, ops)
        S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
        bound = tol.float32_product_tol(S, spec.rank, W.shape)
        A, B = ours.A.astype(np.float64), ours.B.astype(np.float64)
        assert np.abs(B @ A - pb @ pa).max() <= bound, module
        assert np.abs(ours.residual - pres).max() <= bound + tol.RECONSTRUCTION_REL * np.abs(W).max(), module
        if tol.factors_checkable(S, spec.rank):
            fb = tol.float32_factor_tol(S, spec.rank, W.shape, spec.scale)
            pa_c, pb_c = canonical(pa, pb)
            assert np.abs(A - pa_c).max() <= fb and np.abs(B - pb_c).max() <= fb, module


@pytest.fixture(scope="module")
def torch_init(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_init") / "smol"
    run_init("smollm2-135m", out, AdapterSpec(rank=16, init="pissa-fast"), backend="torch", device="cpu", progress=False)
    return out


def test_torch_init_folder_loads_in_peft_with_the_original_logits(torch_init, hf_smollm2):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(PROMPT_IDS[:1])
    with torch.no_grad():
        want = hf_smollm2(ids).logits.numpy()
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(torch_init, dtype=torch.float32),
                                               torch_init / ADAPTER_DIR)
        got = model(ids).logits.numpy()
    assert rel_max_diff(got, want) < 1e-4


def test_converted_lora_on_the_original_model_in_peft_gives_the_trained_logits(torch_init, hf_smollm2, tmp_path):
    from pissa.cli import main
    from pissa_torch import load

    run = tmp_path / "run"
    assert main(["train", str(torch_init), "--data", str(DATA / "train.jsonl"), "--out", str(run), "--steps", "3",
                 "--batch-size", "2", "--lr", "1e-3", "--max-seq-len", "128", "--backend", "torch",
                 "--no-progress"]) == 0
    ids = torch.tensor(PROMPT_IDS)
    trained, _ = load(torch_init, run / "adapter")
    with torch.no_grad():
        ours = trained(ids).logits.numpy()
        before = hf_smollm2(ids).logits.numpy()
        lora = peft.PeftModel.from_pretrained(copy.deepcopy(hf_smollm2), run / "lora")
        theirs = lora(ids).logits.numpy()
    assert rel_max_diff(ours, before) > 1e-3  # training changed the model
    assert rel_max_diff(theirs, ours) < 1e-4
