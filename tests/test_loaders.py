"""Weight loaders against transformers: the same names, shapes and values, and clear errors.

Golden values come from transformers 5 loading the same files (AutoModelForCausalLM with
gguf_file=..., AutoConfig, save_pretrained of a tiny random llama).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from pissa.errors import PissaError
from pissa.files.formats.safetensors import SafetensorsFile
from pissa.files.loaders import open_model
from pissa.files.loaders.gguf import SUPPORTED, GGUFSource, unpermute_rows
from pissa.files.loaders.hf import HFSource

T = gguf.GGMLQuantizationType
SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def smol_path(smollm2_path) -> Path:
    return smollm2_path


@pytest.fixture(scope="module")
def smol(smol_path) -> GGUFSource:
    return GGUFSource(smol_path)


@pytest.fixture(scope="module")
def smol_reference(hf_smollm2):
    """transformers' state dict for the same GGUF (the session's one load)."""
    return hf_smollm2.state_dict()


# --- GGUF: the real SmolLM2 file -------------------------------------------------------------

def test_smol_tensor_types(smol):
    # The types this loader is checked against on real weights; F16, BF16 and Q4_0 are checked
    # on a small written file below.
    types = {t.tensor_type.name for t in smol._reader.tensors}
    assert types == {"F32", "Q8_0", "Q4_1"}
    assert types <= set(SUPPORTED)


@pytest.mark.slow
def test_smol_tensors_equal_transformers(smol, smol_reference):
    ours = smol.shapes()
    ref = smol_reference
    # The file has no output.weight: lm_head is tied. transformers lists lm_head.weight anyway,
    # as the same storage as the embedding, so we check that rather than drop it silently.
    assert smol.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ours
    assert ref["lm_head.weight"].data_ptr() == ref["model.embed_tokens.weight"].data_ptr()
    assert set(ours) == set(ref) - {"lm_head.weight"}
    worst = 0.0
    for name, shape in ours.items():
        a = smol.get(name)
        assert a.dtype == np.float32 and a.shape == shape == tuple(ref[name].shape), name
        worst = max(worst, float(np.abs(a - ref[name].numpy()).max()))
    assert worst <= 1e-6  # measured: 0.0, bit-identical


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permute, as written in its convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_smol_qk_rows_are_unpermuted(smol):
    w = np.random.default_rng(0).standard_normal((192, 7)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    # And on the real file the rows really move: the raw q_proj rows differ from ours.
    raw = {t.name: t for t in smol._reader.tensors}["blk.0.attn_q.weight"]
    stored = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(576, 576)
    ours = smol.get("model.layers.0.self_attn.q_proj.weight")
    assert not np.array_equal(stored, ours)
    np.testing.assert_array_equal(llama_cpp_permute(ours, 9), stored)


def test_smol_config_matches_transformers(smol, smol_path):
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(smol_path.parent, gguf_file=smol_path.name).to_dict()
    ours = smol.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings", "head_dim", "hidden_act",
                "attention_bias", "mlp_bias"):
        assert ours[key] == ref[key], key
    assert ours["rope_parameters"] == ref["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e5}
    assert ours["rope_theta"] == 1e5  # top level too, for mlx-lm
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert smol.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_config_is_read_by_mlx_lm_with_the_right_rope_base(smol):
    pytest.importorskip("mlx.core")
    from mlx_lm.models.llama import ModelArgs

    assert ModelArgs.from_dict(smol.config).rope_theta == 1e5


def test_open_model_finds_gguf_in_a_folder(smol_path, tmp_path):
    # open_model(SMOL) with torch and mlx absent runs in tests/test_hygiene.py.
    folder = tmp_path / "only_gguf"
    folder.mkdir()
    (folder / smol_path.name).symlink_to(smol_path)
    assert isinstance(open_model(str(folder)), GGUFSource)


# --- GGUF: a small written file, for the types SmolLM2 lacks ---------------------------------

def write_llama_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, T]], arch: str = "llama",
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 96, layers: int = 1,
                     vocab: int = 96) -> None:
    """A llama GGUF with these (float32 array in ggml-reversed order = HF [out, in], type) tensors."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(5e4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (array, qtype) in tensors.items():
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, array.astype(np.float32 if qtype == T.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    finish(w)


def tiny_llama_tensors(hidden=64, heads=4, kv_heads=2, inter=96, vocab=96, types=None):
    """Random weights for one llama layer plus an untied output, q/k permuted as llama.cpp does."""
    rng = np.random.default_rng(1)
    head_dim = hidden // heads
    shapes = {
        "token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
        "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * head_dim, hidden), "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
        "blk.0.attn_v.weight": (kv_heads * head_dim, hidden), "blk.0.attn_output.weight": (hidden, heads * head_dim),
        "blk.0.ffn_gate.weight": (inter, hidden), "blk.0.ffn_up.weight": (inter, hidden),
        "blk.0.ffn_down.weight": (hidden, inter),
    }
    types = types or {}
    out = {}
    for name, shape in shapes.items():
        a = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name == "blk.0.attn_q.weight":
            a = llama_cpp_permute(a, heads)
        elif name == "blk.0.attn_k.weight":
            a = llama_cpp_permute(a, kv_heads)
        out[name] = (a, types.get(name, T.F32))
    return out


@pytest.mark.slow
def test_every_supported_type_equals_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    types = {"token_embd.weight": T.Q8_0, "output.weight": T.BF16, "blk.0.attn_q.weight": T.Q4_0,
             "blk.0.attn_k.weight": T.Q4_1, "blk.0.attn_v.weight": T.F16, "blk.0.attn_output.weight": T.Q8_0,
             "blk.0.ffn_gate.weight": T.BF16, "blk.0.ffn_up.weight": T.Q4_0, "blk.0.ffn_down.weight": T.Q4_1}
    assert {t.name for t in types.values()} | {"F32"} == set(SUPPORTED)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, tiny_llama_tensors(types=types))
    src = GGUFSource(path)
    assert src.config["tie_word_embeddings"] is False
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert set(src.shapes()) == set(ref)
    for name, shape in src.shapes().items():
        a = src.get(name)
        assert a.shape == shape == tuple(ref[name].shape), name
        np.testing.assert_allclose(a, ref[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


# --- GGUF: bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [100, 50_000_000])  # in the metadata; in the tensor data
def test_truncated_gguf(smol_path, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(smol_path, "rb") as f:
        bad.write_bytes(f.read(cut))
    with pytest.raises(PissaError, match="is truncated or corrupt.*re-download"):
        GGUFSource(bad)


@pytest.mark.parametrize("blob", [b"", os.urandom(4096), b"GGUF" + os.urandom(4096)])
def test_garbage_gguf(tmp_path, blob):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(blob)
    with pytest.raises(PissaError, match="is truncated or corrupt"):
        open_model(str(bad))


@pytest.mark.parametrize("qtype", [T.Q5_K, T.Q2_K, T.IQ4_XS])
def test_unsupported_gguf_type(tmp_path, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    path = tmp_path / "kquant.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, size), np.uint8), raw_dtype=qtype)  # 4 x 256 values
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    finish(w)
    with pytest.raises(PissaError) as e:
        GGUFSource(path)
    msg = str(e.value)
    assert f"blk.0.attn_q.weight ({qtype.name})" in msg and "F32, F16, BF16, Q8_0, Q4_0, Q4_1" in msg
    assert "\n" not in msg


def test_gguf_of_an_architecture_pissa_does_not_read(tmp_path):
    path = tmp_path / "gemma.gguf"  # Gemma 1: transformers cannot load it from GGUF either
    write_llama_gguf(path, tiny_llama_tensors(), arch="gemma")
    with pytest.raises(PissaError, match=r"architecture 'gemma'.*reads llama \(also Mistral\), qwen2, qwen3, gemma2"):
        GGUFSource(path)


def test_gguf_with_tensors_llama_lacks(tmp_path):
    path = tmp_path / "rope_freqs.gguf"
    tensors = tiny_llama_tensors()
    tensors["rope_freqs.weight"] = (np.ones(8, np.float32), T.F32)
    write_llama_gguf(path, tensors)
    with pytest.raises(PissaError, match="no Hugging Face llama name: rope_freqs.weight"):
        GGUFSource(path)


def test_gguf_without_metadata_or_tokenizer(tmp_path):
    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(bare, "llama")
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    finish(w)
    with pytest.raises(PissaError, match="lacks the metadata key llama.attention.head_count"):
        GGUFSource(bare)
    no_tokenizer = tmp_path / "no_tokenizer.gguf"
    write_llama_gguf(no_tokenizer, tiny_llama_tensors())
    with pytest.raises(PissaError, match="has no tokenizer in its metadata"):
        GGUFSource(no_tokenizer).save_tokenizer(tmp_path / "out")


# --- Hugging Face folders --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random llama saved by transformers: single file, sharded, and bf16."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_hf")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=5e4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="10KB")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    bf16_values = {k: v.float().numpy() for k, v in model.state_dict().items()}  # exact in float32
    return root, bf16_values


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_folder_equals_saved_weights(tiny_hf, layout):
    from safetensors.numpy import load_file

    root, _ = tiny_hf
    ref = load_file(root / "single" / "model.safetensors")  # read back by the safetensors package itself
    src = open_model(str(root / layout))
    assert isinstance(src, HFSource)
    if layout == "sharded":
        assert len(set(json.loads((root / layout / "model.safetensors.index.json").read_text())
                       ["weight_map"].values())) > 1
    assert set(src.shapes()) == set(ref)
    for name, shape in src.shapes().items():
        a = src.get(name)
        assert a.dtype == np.float32 and a.shape == shape == ref[name].shape
        np.testing.assert_array_equal(a, ref[name])
    # transformers 5 wrote the rope base only in rope_parameters; we add the top-level key.
    assert "rope_theta" not in json.loads((root / layout / "config.json").read_text())
    assert src.config["rope_theta"] == 5e4 == src.config["rope_parameters"]["rope_theta"]
    assert src.generation_config["bos_token_id"] == 1


def test_hf_bf16_is_upcast_exactly(tiny_hf):
    root, bf16_values = tiny_hf
    src = HFSource(root / "bf16")
    stored = SafetensorsFile(root / "bf16" / "model.safetensors")
    assert {stored.dtype(n) for n in stored.keys()} == {"BF16"}
    assert set(src.shapes()) == set(bf16_values)
    for name in src.shapes():
        a = src.get(name)
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, bf16_values[name])


def test_hf_safetensors_file_path_opens_its_folder(tiny_hf):
    root, _ = tiny_hf
    assert isinstance(open_model(str(root / "single" / "model.safetensors")), HFSource)


def test_hf_other_dtypes(tmp_path):
    import ml_dtypes

    from pissa.files.formats.safetensors import save

    tensors = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.linspace(0, 1, 4),  # float64
               "c": np.arange(4, dtype=np.int64), "d": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)}
    save(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    src = HFSource(tmp_path)
    assert src.generation_config is None
    assert src.get("a").dtype == src.get("b").dtype == src.get("d").dtype == np.float32
    assert src.get("c").dtype == np.int64
    np.testing.assert_array_equal(src.get("d"), [1.5, -2.25])
    np.testing.assert_array_equal(src.get("b"), np.linspace(0, 1, 4).astype(np.float32))


# --- Hugging Face folders: bad input ---------------------------------------------------------

def test_hf_truncated_safetensors(tiny_hf, tmp_path):
    root, _ = tiny_hf
    bad = tmp_path / "bad"
    shutil.copytree(root / "single", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PissaError, match="truncated or corrupt.*re-download"):
        open_model(str(bad))


def test_hf_no_config(tiny_hf, tmp_path):
    root, _ = tiny_hf
    bad = tmp_path / "noconfig"
    shutil.copytree(root / "single", bad)
    (bad / "config.json").unlink()
    with pytest.raises(PissaError, match="no config.json"):
        HFSource(bad)
    with pytest.raises(PissaError, match="not a model folder"):
        open_model(str(bad))


def test_hf_missing_shard(tiny_hf, tmp_path):
    root, _ = tiny_hf
    bad = tmp_path / "missing"
    shutil.copytree(root / "sharded", bad)
    (bad / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(PissaError, match="shards that are not in the folder: model-00003-of-00012.safetensors"):
        open_model(str(bad))


def test_hf_index_names_absent_tensor(tiny_hf, tmp_path):
    root, _ = tiny_hf
    bad = tmp_path / "absent"
    shutil.copytree(root / "sharded", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00012.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PissaError, match="tensors that its shards lack, e.g. model.layers.9.mlp.up_proj.weight"):
        HFSource(bad)


def test_hf_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PissaError, match="no .safetensors weights; download"):
        HFSource(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PissaError, match="PyTorch weights.*save_pretrained"):
        HFSource(tmp_path)


def test_hf_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PissaError, match="config.json is not readable JSON"):
        HFSource(tmp_path)


def test_missing_model_name():
    with pytest.raises(PissaError, match="not found"):
        open_model("/nonexistent/model")
