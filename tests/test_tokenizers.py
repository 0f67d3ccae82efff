"""Tokenizers written by the loaders load with AutoTokenizer and encode like the reference.

References: transformers 5 reading the GGUF itself (AutoTokenizer.from_pretrained(folder,
gguf_file=...)), and sentencepiece for a tokenizer.model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from pissa.files.loaders import resolve
from pissa.files.loaders.gguf import GGUFSource
from pissa.files.loaders.hf import HFSource

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TEXTS = [
    "What is the capital of France?",
    "Hello world! 12345 67.89",
    "ünïcödé, 日本語 and emoji 🙂 too",
    "def f(x):\n    return x  # tabs\tand  double  spaces",
    "<|im_start|>user\nhi<|im_end|>\n",
    "trailing spaces   ",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def assert_same_tokenizer(ours, ref, texts=TEXTS):
    assert type(ours).__name__ == type(ref).__name__
    assert len(ours) == len(ref)
    assert ours.all_special_tokens == ref.all_special_tokens
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for text in texts:
        ids = ref(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == ref.decode(ids)
    if ref.chat_template is not None:
        assert ours.chat_template == ref.chat_template
        for gen in (False, True):
            want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == want
            assert ours(want, add_special_tokens=False).input_ids == ref(want, add_special_tokens=False).input_ids
            assert (ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, return_dict=False)
                    == ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, return_dict=False))


# --- The real SmolLM2 GGUF (byte-level BPE, chat template) -----------------------------------

@pytest.fixture(scope="module")
def smol_tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    path = resolve("smollm2-135m")
    src = GGUFSource(path)
    out = tmp_path_factory.mktemp("smol_tok")
    names = src.save_tokenizer(out)
    # A model folder as pissa writes it has config.json beside the tokenizer; load it both ways.
    with_config = tmp_path_factory.mktemp("smol_model")
    for n in names:
        shutil.copy(out / n, with_config / n)
    (with_config / "config.json").write_text(json.dumps(src.config))
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return names, out, ref, AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(with_config)


def test_smol_tokenizer_files(smol_tokenizers):
    names, out, _, _, _ = smol_tokenizers
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == names


def test_smol_tokenizer_equals_transformers_gguf(smol_tokenizers):
    _, _, ref, ours, ours_in_model_folder = smol_tokenizers
    assert_same_tokenizer(ours, ref)
    assert_same_tokenizer(ours_in_model_folder, ref)
    assert ours.chat_template.startswith("{% for message in messages %}")
    chat = [{"role": "user", "content": "Hi"}]
    ids = ours.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids == ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids[0] == ours.convert_tokens_to_ids("<|im_start|>")


def test_hf_source_copies_tokenizer_files(smol_tokenizers, tmp_path):
    names, out, ref, _, _ = smol_tokenizers
    folder = tmp_path / "model"
    shutil.copytree(out, folder)
    (folder / "config.json").write_text("{}")
    from pissa.files.formats.safetensors import save

    save(folder / "model.safetensors", {"w": np.zeros(2, np.float32)})
    copied = tmp_path / "copied"
    assert HFSource(folder).save_tokenizer(copied) == ["tokenizer.json", "tokenizer_config.json",
                                                       "chat_template.jinja"]
    for n in names:
        assert (copied / n).read_bytes() == (out / n).read_bytes()
    for n in names:
        (folder / n).unlink()
    assert HFSource(folder).save_tokenizer(tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


# --- sentencepiece (Llama-2 style tokenizer.model) -------------------------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A tiny BPE sentencepiece model trained like Llama-2's: byte fallback, no normalisation."""
    root = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "weights", "singular",
             "value", "adapter", "train", "low", "rank", "matrix", "hello", "world", "pissa"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!", "?", ", 42."])
             for _ in range(2000)]
    (root / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=340, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return root / "sp.model"


SP_TEXTS = ["the quick brown fox", "Hello world! 42.", "pissa adapter low rank", "ünïcödé zebra 日本",
            "line\nbreak", "12345 67", "a  b   c", "trailing  "]


def test_sentencepiece_folder_encodes_like_sentencepiece(sp_model, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "llama2"
    folder.mkdir()
    shutil.copy(sp_model, folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    from pissa.files.formats.safetensors import save

    save(folder / "model.safetensors", {"w": np.zeros(2, np.float32)})
    out = tmp_path / "out"
    assert HFSource(folder).save_tokenizer(out) == ["tokenizer_config.json", "tokenizer.model"]
    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in SP_TEXTS:
        assert tok(text).input_ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.xfail(strict=True, reason="transformers 5 builds a Metaspace(prepend_scheme='first') tokenizer from "
                   "tokenizer.model, which adds no dummy prefix before a leading space; sentencepiece does")
def test_sentencepiece_leading_space_known_difference(sp_model, tmp_path):
    from transformers import AutoTokenizer

    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok(" one", add_special_tokens=False).input_ids == sp.encode(" one")


# --- A GGUF whose tokenizer is sentencepiece (tokenizer.ggml.model = llama) ------------------

def test_sentencepiece_gguf_tokenizer_equals_transformers_gguf(sp_model, tmp_path):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(path, "llama")
    hidden, heads = 32, 2
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                       (w.add_feed_forward_length, 32), (w.add_head_count, heads), (w.add_head_count_kv, heads),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 1e4)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n, hidden)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((hidden, hidden)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = tmp_path / "out"
    GGUFSource(path).save_tokenizer(out)
    ours = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert_same_tokenizer(ours, ref, SP_TEXTS)
    assert ours("the fox").input_ids[0] == 1  # llama.cpp's default: BOS on for sentencepiece
