"""llama.cpp itself (llama-cpp-python's `llama_cpp`) running the GGUF files pissa writes: the
original model's GGUF with the converted LoRA GGUF computes the merged GGUF's logits and greedy
tokens, for each architecture and for SmolLM2, and llama.cpp's tokenizer reads what transformers'
does. Skipped where `llama_cpp` is not importable (CI); docs/serving.md records a run.
"""

from __future__ import annotations

import numpy as np
import pytest

from pissa.cli import main
from tests.conftest import rel_max_diff
from tests.test_gguf_archs import TEXTS
from tests.test_gguf_export import IDS, exported  # noqa: F401  (a fixture)
from tests.test_gguf_export_smollm2 import smol_lora  # noqa: F401  (a fixture)

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow


def llama(path, lora=None):
    # A float32 KV cache (llama.cpp's default is f16, whose rounding would blur the comparison).
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, logits_all=True,
                           verbose=False, seed=0, n_threads=2, type_k=0, type_v=0)


def logits(model, ids) -> np.ndarray:
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float64)


def greedy(model, ids, n: int = 12) -> list[int]:
    model.reset()
    out = []
    for token in model.generate(ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n:
            return out
    return out


def test_base_plus_lora_is_the_merged_model(exported, tmp_path):
    ids = IDS[0]
    merged = llama(exported.root / "merged-f32.gguf")
    want, want_tokens = logits(merged, ids), greedy(merged, ids)
    with_lora = llama(exported.src, exported.root / "lora.gguf")
    # The same model up to the init's reconstruction error and float32 summation order: measured
    # 4e-7 (llama, Phi-3, Qwen2/3) to 3e-5 (Gemma 3) relative.
    assert rel_max_diff(logits(with_lora, ids), want) <= 1e-4
    assert greedy(with_lora, ids) == want_tokens
    # The trained adapter itself on the residual model's GGUF.
    assert main(["convert", "--trained", str(exported.trained), "--base", "residual", "--model", str(exported.init),
                 "--out", str(tmp_path / "t.gguf")]) == 0
    assert main(["merge", str(exported.init), "--out", str(tmp_path / "r.gguf"), "--gguf-type", "f32"]) == 0
    on_residual = llama(tmp_path / "r.gguf", tmp_path / "t.gguf")
    assert rel_max_diff(logits(on_residual, ids), want) <= 1e-4
    assert greedy(on_residual, ids) == want_tokens


def test_llama_cpp_tokenizes_as_transformers(exported):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(exported.root / "merged")
    ours, theirs = llama(exported.root / "merged-f32.gguf"), llama(exported.src)
    for text in TEXTS:
        # As llama.cpp reads the file its own converter writes (tests/test_gguf_archs.py)...
        got = ours.tokenize(text.encode(), add_bos=False, special=True)
        assert got == theirs.tokenize(text.encode(), add_bos=False, special=True), text
        # ... and as transformers does, but where the two libraries differ on their own: a text that
        # starts with a space, in a sentencepiece vocabulary.
        if not text.startswith(" "):
            assert got == ref(text, add_special_tokens=False).input_ids, text


def test_smollm2_base_plus_lora(smollm2_path, smol_lora):
    root, _ = smol_lora
    prompt = llama(smollm2_path).tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                          b"<|im_start|>assistant\n", add_bos=False, special=True)
    merged, with_lora = llama(root / "merged.gguf"), llama(smollm2_path, root / "lora.gguf")
    # The Q4_1 base runs its matmuls on 8-bit activations, the f32 merged model does not: the logits
    # differ by that quantisation (measured 5.0e-2 relative; 2.8e-2 between the Q4_1 file and its own
    # f32 GGUF, without a LoRA), the greedy answer not at all ("The capital of France is Paris.").
    assert rel_max_diff(logits(with_lora, prompt), logits(merged, prompt)) <= 0.1
    assert greedy(with_lora, prompt, 16) == greedy(merged, prompt, 16)


def test_smollm2_tokenizer_from_a_folder(tiny_chat_base, tmp_path):
    from transformers import AutoTokenizer

    assert main(["merge", str(tiny_chat_base), "--out", str(tmp_path / "m.gguf"), "--gguf-type", "f32"]) == 0
    ours, ref = llama(tmp_path / "m.gguf"), AutoTokenizer.from_pretrained(tiny_chat_base)
    messages = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "It is 42."}]
    for text in ("Hello world", "  two  spaces\tand\nlines", "héllo wörld ✓",
                 ref.apply_chat_template(messages, tokenize=False)):
        assert ours.tokenize(text.encode(), add_bos=False, special=True) == \
            ref(text, add_special_tokens=False).input_ids, text
