"""GPT-2's Conv1D layers (weights stored [in, out]) on both backends, with PEFT as the oracle.

A tiny random GPT-2 built by transformers, in the two layouts users have: the Hub's (tensor names
without "transformer.", what openai-community/gpt2 ships and mlx-lm reads) and save_pretrained's.
pissa init must write what PEFT loads with the original logits (it wrote A and B with each other's
shapes, or under names PEFT silently skipped), and training, convert and merge must give the same
model in PEFT, transformers, mlx-lm and both backends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

from pissa.files import layouts  # noqa: E402
from pissa.cli import main  # noqa: E402
from pissa.files.formats.peft import load_adapter  # noqa: E402
from pissa.files.formats.safetensors import SafetensorsFile, load as load_st, save as save_st  # noqa: E402
from tests.conftest import BACKENDS, DATA, PROMPT_IDS, rel_max_diff  # noqa: E402

TRAINING = [b for b in BACKENDS if b != "numpy"]
IDS = torch.tensor(PROMPT_IDS)
SHAPES = {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, smollm2_tokenizer_dir) -> dict[str, Path]:
    """{"saved": save_pretrained's folder, "hub": the same model in the Hub's layout}, with
    SmolLM2's tokenizer (the vocabulary size matches) so that it trains."""
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=49152, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(root / "saved")
    shutil.copytree(root / "saved", root / "hub")
    tensors = load_st(root / "hub" / "model.safetensors")
    assert "transformer.h.0.attn.c_attn.weight" in tensors
    save_st(root / "hub" / "model.safetensors", {k.removeprefix("transformer."): v for k, v in tensors.items()},
            metadata={"format": "pt"})
    cfg = json.loads((root / "hub" / "config.json").read_text())
    (root / "hub" / "config.json").write_text(json.dumps({**cfg, "n_ctx": cfg["n_positions"]}))  # as the Hub's has
    for folder in (root / "saved", root / "hub"):
        for f in smollm2_tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    return {"saved": root / "saved", "hub": root / "hub"}


def logits(folder: Path, adapter: Path | None = None) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(IDS).logits.numpy()


@pytest.fixture(scope="module")
def inits(gpt2) -> dict[tuple[str, str], Path]:
    out = {}
    for layout, folder in gpt2.items():
        for backend in BACKENDS:
            out[layout, backend] = folder.parent / f"init-{layout}-{backend}"
            assert main(["init", str(folder), "--out", str(out[layout, backend]), "--rank", "4",
                         "--backend", backend, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("layout", ["hub", "saved"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_loads_the_init_with_the_original_logits(layout, backend, gpt2, inits):
    init = inits[layout, backend]
    adapter = load_adapter(init / "pissa_init")
    assert json.loads((init / "pissa_init" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert len(adapter.factors) == 8
    for m, (A, B) in adapter.factors.items():
        out, n_in = SHAPES[m.split(".", 3)[3]]
        assert m.startswith("transformer.h.") and A.shape == (4, n_in) and B.shape == (out, 4), m
    stored = SafetensorsFile(init / "model.safetensors")  # the Hub's layout, which mlx-lm reads too
    assert stored.shape("h.0.attn.c_attn.weight") == (32, 96) and "wte.weight" in stored.keys()
    assert rel_max_diff(logits(init, init / "pissa_init"), logits(gpt2["hub"])) < 1e-5


def test_openai_gpt_init_gives_peft_the_original_logits(tmp_path):
    """OpenAI GPT, the other causal LM built on Conv1D (its embeddings are tokens_embed and
    positions_embed, which all-linear leaves alone)."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
                         ).save_pretrained(tmp_path / "base")
    assert main(["init", str(tmp_path / "base"), "--out", str(tmp_path / "init"), "--rank", "4", "--no-progress"]) == 0
    adapter = load_adapter(tmp_path / "init" / "pissa_init")
    assert sorted({m.split(".", 3)[3] for m in adapter.factors}) == sorted(SHAPES)
    ids = torch.tensor([[5, 17, 100, 42, 9]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()(ids).logits.numpy()
        got = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "init"),
                                             tmp_path / "init" / "pissa_init").eval()(ids).logits.numpy()
    assert rel_max_diff(got, want) < 1e-5


def test_the_factors_are_peft_own_pissa_init(gpt2, inits):
    """PEFT's PiSSA on the same Conv1D model: the same s*B@A (PEFT leaves the SVD's signs as they
    come, so the factors are compared through their product) and the same residual, within the
    gap-derived bound of PEFT's float32 SVD (tests/conformance/tolerances.py)."""
    from tests.conformance import tolerances as tol

    model = AutoModelForCausalLM.from_pretrained(gpt2["saved"], dtype=torch.float32)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="pissa",
                                                        target_modules=["c_attn", "c_proj", "c_fc"]))
    ours = load_adapter(inits["hub", "numpy"] / "pissa_init")
    residual = load_st(inits["hub", "numpy"] / "model.safetensors")
    for m, (A, B) in ours.factors.items():
        layer = theirs.base_model.model.get_submodule(m)
        want = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy()
        W = (B.astype(np.float64) @ A + residual[m.removeprefix("transformer.") + ".weight"].T)
        bound = tol.float32_product_tol(np.linalg.svd(W, compute_uv=False), 4, W.shape)
        assert np.abs(B @ A - want).max() <= bound, m
        base = layer.base_layer.weight.detach().numpy()  # Conv1D: [in, out], as our file stores it
        stored = residual[m.removeprefix("transformer.") + ".weight"]
        assert np.abs(stored - base).max() <= bound + tol.RECONSTRUCTION_REL * np.abs(W).max(), m


def test_mlx_lm_loads_the_residual_folder(gpt2, inits):
    if "mlx" not in BACKENDS:
        pytest.skip("needs mlx")
    import mlx.core as mx
    import mlx_lm
    from pissa_mlx import load

    init = inits["saved", "mlx"]
    residual, _ = mlx_lm.load(str(init))
    assert rel_max_diff(np.array(residual(mx.array(PROMPT_IDS))), logits(init)) < 1e-5
    model, _ = load(init)
    assert rel_max_diff(np.array(model(mx.array(PROMPT_IDS))), logits(gpt2["hub"])) < 1e-5


# ------------------------------------------------------------------ train, convert, merge
@pytest.fixture(scope="module")
def runs(inits) -> dict[str, Path]:
    out = {}
    for backend in TRAINING:
        out[backend] = inits["hub", "numpy"].parent / f"run-{backend}"
        assert main(["train", str(inits["hub", "numpy"]), "--data", str(DATA / "train.jsonl"), "--out",
                     str(out[backend]), "--steps", "3", "--lr", "3e-3", "--batch-size", "2", "--max-seq-len",
                     "128", "--no-progress", "--backend", backend]) == 0
    return out


def trained_logits(backend: str, init: Path, adapter: Path) -> np.ndarray:
    if backend == "torch":
        from pissa_torch import load

        model, _ = load(init, adapter)
        with torch.no_grad():
            return model(IDS).logits.numpy()
    import mlx.core as mx
    from pissa_mlx import load

    model, _ = load(init, adapter)
    return np.array(model(mx.array(PROMPT_IDS)))


@pytest.mark.parametrize("backend", TRAINING)
def test_a_trained_gpt2_converts_and_merges_to_the_same_model_everywhere(backend, gpt2, inits, runs, tmp_path):
    init, run = inits["hub", "numpy"], runs[backend]
    want = trained_logits(backend, init, run / "adapter")
    assert rel_max_diff(want, logits(gpt2["hub"])) > 1e-3  # training changed the model
    for other in TRAINING:  # the other backend computes the same trained model
        assert rel_max_diff(trained_logits(other, init, run / "adapter"), want) < 1e-5, other
    assert main(["convert", "--initial", str(init / "pissa_init"), "--trained", str(run / "adapter"),
                 "--out", str(tmp_path / "lora"), "--format", "mlx-lm"]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert rel_max_diff(logits(gpt2["hub"], tmp_path / "lora"), want) < 1e-5       # PEFT, original model
    assert main(["merge", str(init), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert rel_max_diff(logits(tmp_path / "merged"), want) < 1e-5                   # transformers
    if "mlx" in BACKENDS:
        import mlx.core as mx
        import mlx_lm

        model, _ = mlx_lm.load(str(gpt2["hub"]), adapter_path=str(tmp_path / "lora" / "mlx_lm"))
        assert rel_max_diff(np.array(model(mx.array(PROMPT_IDS))), want) < 1e-5    # mlx-lm, original model
        merged, _ = mlx_lm.load(str(tmp_path / "merged"))
        assert rel_max_diff(np.array(merged(mx.array(PROMPT_IDS))), want) < 1e-5


def test_torch_apply_merge_and_fuse_on_conv1d(gpt2, inits):
    """apply() decomposes Conv1D weights as pissa init does; merge, unmerge and fuse keep the function,
    and fuse gives back a Conv1D."""
    from pissa.adapters.spec import AdapterSpec
    from pissa_torch import adapter_state_dict, apply, merge, unmerge
    from pissa_torch.backend import adapter_layers as pissa_layers
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(gpt2["saved"], dtype=torch.float32).eval()
    apply(model, AdapterSpec(rank=4))
    want = load_adapter(inits["hub", "numpy"] / "pissa_init")
    got = adapter_state_dict(model)
    for m, (A, B) in want.factors.items():
        np.testing.assert_allclose(got[f"base_model.model.{m}.lora_A.weight"].numpy(), A, atol=1e-6)
        np.testing.assert_allclose(got[f"base_model.model.{m}.lora_B.weight"].numpy(), B, atol=1e-6)
    with torch.no_grad():
        before = model(IDS).logits.numpy()
        assert rel_max_diff(before, logits(gpt2["hub"])) < 1e-5
        merge(model)
        assert rel_max_diff(model(IDS).logits.numpy(), before) < 1e-5
        unmerge(model)
        for name, layer in list(pissa_layers(model)):
            parent, _, child = name.rpartition(".")
            fused = layer.fuse()
            assert isinstance(fused, Conv1D)
            setattr(model.get_submodule(parent), child, fused)
        assert rel_max_diff(model(IDS).logits.numpy(), before) < 1e-5


# ------------------------------------------------------------------ what pissa refuses
@pytest.mark.parametrize("args, words", [(["--quantize", "nf4"], "--quantize does not support gpt2's Conv1D"),
                                         (["--init", "full"], "--kind full does not support gpt2's Conv1D")])
def test_quantize_and_full_refuse_conv1d_before_writing(args, words, gpt2, tmp_path, capsys):
    assert main(["init", str(gpt2["hub"]), "--out", str(tmp_path / "q"), "--rank", "4", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("model_type, names, words", [
    ("imagegpt", ["transformer.h.0.attn.c_attn.weight"], "is not a causal language model pissa trains"),
    ("gpt2", ["model.h.0.attn.c_attn.weight"], "gpt2 checkpoint saved by mlx-lm"),
])
def test_conv1d_checkpoints_pissa_cannot_orient_are_one_line(model_type, names, words, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_st(tmp_path / "m" / "model.safetensors", {n: np.zeros((4, 12), np.float32) for n in names})
    assert main(["init", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--rank", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_layout_names_and_orientation():
    hub = layouts.of({"model_type": "gpt2"}, ["h.0.attn.c_attn.weight", "wte.weight"], "x")
    saved = layouts.of({"model_type": "gpt2"}, ["transformer.h.0.attn.c_attn.weight"], "x")
    assert hub.name("h.0.attn.c_attn.weight") == saved.name("transformer.h.0.attn.c_attn.weight")
    assert hub.name("lm_head.weight") == "lm_head.weight" == hub.stored_name("lm_head.weight")
    name = "transformer.h.0.attn.c_attn.weight"
    assert hub.transposed(name) and not hub.transposed("transformer.h.0.attn.c_attn.bias")
    assert not hub.transposed("transformer.wte.weight") and hub.shape(name, (32, 96)) == (96, 32)
    assert saved.for_writing() == hub and layouts.of({"model_type": "llama"}, [], "x").identity
    assert layouts.mlx_lm_path("gpt2", "transformer.h.1.mlp.c_fc") == "model.h.1.mlp.c_fc"
    assert layouts.from_mlx_lm_path("gpt2", "model.h.1.mlp.c_fc") == "transformer.h.1.mlp.c_fc"
    assert layouts.mlx_lm_path("llama", "model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
