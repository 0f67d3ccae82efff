"""Hugging Face folders of the architectures users fine-tune (README's table): a tiny random
checkpoint of each, saved by transformers itself, goes through `pissa init`; PEFT loads the
residual model with its adapter and gives the original logits, and so does the MLX backend."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_gguf_archs import CASES

torch = pytest.importorskip("torch")

IDS = [[5, 17, 40, 3, 99, 120, 7, 64]]


@pytest.mark.parametrize("arch", ["llama", *CASES])
def test_init_gives_the_original_logits_in_peft_and_mlx(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    if arch == "llama":
        kwargs = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    else:
        kwargs = dict(CASES[arch].hf_config)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=128, bos_token_id=None, eos_token_id=None,
                               pad_token_id=None, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # transformers initialises some norms to constants: make every weight count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        want = model(torch.tensor(IDS)).logits.numpy()
    model.save_pretrained(tmp_path / "src")
    run_init(str(tmp_path / "src"), tmp_path / "out", AdapterSpec(rank=4), backend="numpy", progress=False)
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(residual, tmp_path / "out" / "pissa_init").eval()(torch.tensor(IDS)).logits
    scale = np.abs(want).max()
    assert np.abs(got.numpy() - want).max() <= 5e-6 * scale
    mx = pytest.importorskip("mlx.core")
    from pissa_mlx import load

    mlx_model, _ = load(tmp_path / "out")
    assert np.abs(np.array(mlx_model(mx.array(IDS))) - want).max() <= 5e-6 * scale
