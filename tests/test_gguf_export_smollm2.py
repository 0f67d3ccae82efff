"""GGUF files pissa writes, on the real SmolLM2-135M (tests/test_gguf_export.py has the rest): a
LoRA on all 210 linear weights, whose GGUF with llama.cpp's q/k row order for SmolLM2's 9 query and
3 key/value heads, added to the original Q4_1 file as llama.cpp adds it, is the merged f32 GGUF;
the merged GGUF is the merged folder, bit for bit in pissa's reader and in logits in transformers';
the merged GGUF keeps the original file's tokenizer; and SmolLM2's 49k-token tokenizer, read from a
folder's tokenizer.json, is written as the original file holds it, and transformers reads it back as
the folder's.
"""

from __future__ import annotations

import numpy as np
import pytest

from pissa.files.formats.gguf_write import gguf_name
from pissa.files.loaders import open_model
from pissa.files.loaders.gguf import GGUFSource
from tests.conftest import rel_max_diff
from tests.test_gguf_export import EPS32, fields, llama_cpp_delta, raw, run
from tests.test_loaders import llama_cpp_permute

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.slow  # transformers builds the 49k-token tokenizer from the GGUF in about 4 s
def test_real_tokenizer_from_a_folder(tiny_chat_base, smollm2, tmp_path):
    """SmolLM2's real 49k-token byte-level vocabulary, read from a folder's tokenizer.json (the path
    of any Hugging Face model): transformers encodes as the folder does, and its types and ids are
    the original GGUF's."""
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    assert run("merge", str(tiny_chat_base), "--out", str(out), "--gguf-type", "f32") == 0
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ref = AutoTokenizer.from_pretrained(tiny_chat_base)
    messages = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "It is 42."}]
    for text in ("Hello world", "  two  spaces\tand\nlines", "12345 + 678 = 13023", "héllo wörld ✓",
                 ref.apply_chat_template(messages, tokenize=False)):
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ref(text).input_ids) == ref.decode(ref(text).input_ids), text
    assert ours.chat_template == ref.chat_template
    meta, original = fields(out), {k: f.contents() for k, f in smollm2.tokenizer_fields().items()}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert meta[key] == original[key], key
    # transformers built this folder's tokenizer with GPT-2's split (it has none for SmolLM2's): so is its name.
    assert meta["tokenizer.ggml.pre"] == "gpt-2"


@pytest.fixture(scope="module")
def smol_lora(smollm2, tmp_path_factory):
    """A rank-8 LoRA on every one of SmolLM2's 210 linear weights, its GGUF, and the original model
    with it merged, as an f32 GGUF and as a folder."""
    from pissa import AdapterSpec
    from pissa.adapters.adapter import Adapter
    from pissa.files.formats.gguf_lora import save_lora_gguf
    from pissa.jobs.merge import run_merge

    root = tmp_path_factory.mktemp("smol-export")
    rng = np.random.default_rng(1)
    factors = {n[: -len(".weight")]: ((0.05 * rng.standard_normal((8, s[1]))).astype(np.float32),
                                      (0.05 * rng.standard_normal((s[0], 8))).astype(np.float32))
               for n, s in smollm2.shapes().items() if n.endswith("_proj.weight")}
    lora = Adapter(AdapterSpec(rank=8, alpha=16, init="lora"), factors, info={"role": "lora"})
    save_lora_gguf(root / "lora.gguf", lora, smollm2.config)
    run_merge("smollm2-135m", lora, root / "merged.gguf", gguf_type="f32", progress=False)
    run_merge("smollm2-135m", lora, root / "merged", progress=False)
    return root, lora


@pytest.mark.slow  # SmolLM2 merged to an f32 GGUF and a folder, and read back: about 20 s
def test_smollm2_lora_gguf_and_merge(smollm2, smol_lora):
    root, peft = smol_lora
    lora, alpha = raw(root / "lora.gguf"), fields(root / "lora.gguf")["adapter.lora.alpha"]
    assert len(lora) == 2 * 210 and alpha == 16
    ours, folder = GGUFSource(root / "merged.gguf"), open_model(str(root / "merged"))
    adapted = {gguf_name("llama", m + ".weight") for m in peft.factors}
    base, merged = raw(smollm2._reader, adapted), raw(ours._reader, adapted)
    for m, (A, B) in peft.factors.items():
        name = gguf_name("llama", m + ".weight")
        want = 2.0 * (B.astype(np.float64) @ A.astype(np.float64))
        if m.endswith(("q_proj", "k_proj")):  # 9 query heads, 3 key/value heads
            want = llama_cpp_permute(want, 9 if "q_proj" in m else 3)
        delta = llama_cpp_delta(lora, alpha, name)
        np.testing.assert_array_equal(delta, want, err_msg=m)
        # Q4_1 base + LoRA, as llama.cpp adds them, is the merged f32 GGUF to float32 rounding.
        tol = 2 * EPS32 * (np.abs(base[name]).max() + np.abs(delta).max())
        assert np.abs(base[name] + delta - merged[name]).max() <= tol, m
    for name in folder.shapes():
        np.testing.assert_array_equal(ours.get(name), folder.get(name), err_msg=name)
    # A GGUF input's tokenizer is copied: every reader tokenizes the merged file as the original.
    original = smollm2.tokenizer_fields()
    assert {k: f.contents() for k, f in ours.tokenizer_fields().items() if k.startswith("tokenizer.")} == \
        {k: f.contents() for k, f in original.items() if k.startswith("tokenizer.")}


@pytest.mark.slow  # transformers reads the 540 MB GGUF in about 17 s
def test_smollm2_merged_gguf_in_transformers(smol_lora):
    from transformers import AutoModelForCausalLM

    from tests.conftest import PROMPT_IDS

    root, _ = smol_lora
    gguf_model = AutoModelForCausalLM.from_pretrained(root, gguf_file="merged.gguf", dtype=torch.float32).eval()
    folder = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = (m(torch.tensor(PROMPT_IDS)).logits.numpy() for m in (gguf_model, folder))
    assert rel_max_diff(got, want) <= 1e-5  # measured: 0
