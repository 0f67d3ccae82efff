"""GGUF architectures beyond llama, each against transformers' own GGUF loading.

Every case starts from a tiny random transformers checkpoint (names and shapes from the model class
itself), written to GGUF as llama.cpp's convert_hf_to_gguf.py writes that architecture: names from
gguf-py's TensorNameMap (the converter's own map), llama's q/k row permutation, Gemma's norm + 1,
lm_head left out when tied, and the metadata keys the converter writes. The reference is
AutoModelForCausalLM / AutoConfig / AutoTokenizer.from_pretrained(folder, gguf_file=name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest

from pissa.errors import PissaError
from pissa.files.loaders.gguf import GGUFSource
from tests.test_loaders import finish, llama_cpp_permute

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@dataclass(frozen=True)
class Case:
    gguf_arch: str
    hf_config: dict                         # kwargs of the transformers config class (AutoConfig.for_model)
    vocab: str                              # "gpt2" (byte-level BPE) or "spm" (sentencepiece)
    name: str = "tiny"
    meta: dict = field(default_factory=dict)  # extra metadata the converter writes, gguf key suffix -> value


COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=4096)
CASES = {
    # llama.cpp writes Mistral as "llama"; Nemo's head_dim (128 of 5120 / 32) is not hidden / heads.
    "mistral": Case("llama", dict(model_type="mistral", **COMMON, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=32, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                                  tie_word_embeddings=False), "spm", name="Mistral-Nemo-Instruct-2407"),
    "qwen2": Case("qwen2", dict(model_type="qwen2", **COMMON, num_attention_heads=4, num_key_value_heads=2,
                                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True), "gpt2"),
    # head_dim 128 as in every Qwen3: transformers 5.24 ignores the file's key_length for qwen3.
    "qwen3": Case("qwen3", dict(model_type="qwen3", **COMMON, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True), "gpt2"),
    # head_dim 256 as in every Gemma 2 and 3 but the 27B: transformers takes query_pre_attn_scalar 256.
    "gemma2": Case("gemma2", dict(model_type="gemma2", **COMMON, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                                  rms_norm_eps=1e-6, tie_word_embeddings=True), "spm",
                   meta={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    # Six layers, so that one (the sixth) is global.
    "gemma3": Case("gemma3", dict(model_type="gemma3_text", **{**COMMON, "num_hidden_layers": 6},
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                  sliding_window=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 1e4}}), "spm"),
    "phi3": Case("phi3", dict(model_type="phi3", **COMMON, num_attention_heads=4, num_key_value_heads=2,
                              rope_theta=1e4, rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False),
                 "spm", meta={"rope.scaling.original_context_length": 4096}),
}


# --- A tiny tokenizer in the metadata, as llama.cpp's converter writes one --------------------

def add_vocab(w: gguf.GGUFWriter, kind: str, arch: str) -> int:
    if kind == "gpt2":  # Qwen's byte-level BPE: 256 byte symbols, a few merges, control tokens
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "in"] + specials
        types = [1] * (len(tokens) - 3) + [3] * 3
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(["Ġ t", "h e", "Ġt he", "i n"])
        w.add_bos_token_id(tokens.index("<|endoftext|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_pad_token_id(tokens.index("<|endoftext|>"))
        w.add_add_bos_token(False)
    else:  # sentencepiece with byte fallback, Gemma's or Llama/Phi-3's special tokens
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if arch.startswith("gemma") else ["<unk>", "<s>", "</s>"]
        pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "in"]
        tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
        types = [2 if t == "<unk>" else 3 for t in specials] + [6] * 256 + [1] * len(pieces)
        w.add_tokenizer_model("llama")
        w.add_token_scores([0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))])
        w.add_bos_token_id(tokens.index(specials[2] if arch.startswith("gemma") else "<s>"))
        w.add_eos_token_id(tokens.index("<eos>" if arch.startswith("gemma") else "</s>"))
        w.add_unk_token_id(tokens.index("<unk>"))
        if arch.startswith("gemma"):
            w.add_pad_token_id(0)
            w.add_add_space_prefix(False)
        elif arch == "phi3":
            w.add_pad_token_id(tokens.index("</s>"))  # Phi3Config's default pad id would be off the vocabulary
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    return len(tokens)


# --- The checkpoint and its GGUF -------------------------------------------------------------

def random_state(model, arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct random values for every tensor (norms too), so a swapped name or a missed shift shows."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, t in model.state_dict().items():
        a = 0.1 * rng.standard_normal(tuple(t.shape)).astype(np.float32)
        if name.endswith("norm.weight") and not arch.startswith("gemma"):
            a += 1  # RMSNorm scales by w (Gemma: by 1 + w)
        state[name] = a
    return state


def write_like_llama_cpp(path: Path, case: Case, cfg, state: dict[str, np.ndarray]) -> None:
    arch = case.gguf_arch
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(key, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(case.name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if "head_dim" in case.hf_config:  # the converter writes it when config.json has it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch != "gemma2":  # Gemma 2's converter writes no rope base
        rope = cfg.rope_parameters
        w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(head_dim)
    if arch in ("gemma2", "gemma3", "phi3"):
        w.add_sliding_window(cfg.sliding_window)
    for k, v in case.meta.items():
        w.add_float32(f"{arch}.{k}", v) if isinstance(v, float) else w.add_uint32(f"{arch}.{k}", v)
    vocab = add_vocab(w, case.vocab, arch)
    assert vocab == cfg.vocab_size
    for hf, a in state.items():
        if hf == "lm_head.weight" and (cfg.tie_word_embeddings or arch == "gemma2"):
            continue  # llama.cpp writes output.weight only when it is not the embedding
        if arch == "llama" and hf.endswith("self_attn.q_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and hf.endswith("self_attn.k_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        elif arch.startswith("gemma") and hf.endswith("norm.weight"):
            a = a + np.float32(1)
        module, suffix = hf.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(module)}.{suffix}", a)
    finish(w)


@dataclass
class Built:
    case: Case
    path: Path
    state: dict                # the original checkpoint, Hugging Face layout
    ours: GGUFSource
    ref: object                # transformers' model loaded from the GGUF


def vocab_size(kind: str, arch: str) -> int:
    """The size of the vocabulary add_vocab writes, which the checkpoint's embedding must match."""
    return add_vocab(gguf.GGUFWriter(None, arch), kind, arch)


def write_case(name: str, path: Path) -> tuple[Case, dict[str, np.ndarray]]:
    """CASES[name] as a random checkpoint, written to `path` as llama.cpp's converter writes it:
    (the case, the checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    case = CASES[name]
    kwargs = dict(case.hf_config)
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=vocab_size(case.vocab, case.gguf_arch),
                               bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs)
    state = random_state(AutoModelForCausalLM.from_config(cfg), case.gguf_arch)
    write_like_llama_cpp(path, case, cfg, state)
    return case, state


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory) -> Built:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp(request.param)
    path = folder / f"{request.param}.gguf"
    case, state = write_case(request.param, path)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
    return Built(case, path, state, GGUFSource(path), ref.eval())


def test_tensors_equal_transformers(built):
    ours, ref = built.ours, built.ref.state_dict()
    shapes = ours.shapes()
    assert ours.config["tie_word_embeddings"] == built.case.hf_config["tie_word_embeddings"]
    if ours.config["tie_word_embeddings"]:
        # transformers lists the tied lm_head as the embedding's storage; the file has no such tensor.
        assert "lm_head.weight" not in shapes
        assert ref["lm_head.weight"].data_ptr() == ref["model.embed_tokens.weight"].data_ptr()
        assert set(shapes) == set(ref) - {"lm_head.weight"}
    else:
        assert set(shapes) == set(ref)
    for name, shape in shapes.items():
        a = ours.get(name)
        assert a.dtype == np.float32 and a.shape == shape == tuple(ref[name].shape), name
        np.testing.assert_array_equal(a, ref[name].numpy(), err_msg=name)
        # And the checkpoint the file was written from: bit for bit, but Gemma's norms went through
        # (w + 1) - 1 in float32.
        shifted = built.case.gguf_arch.startswith("gemma") and name.endswith("norm.weight")
        np.testing.assert_allclose(a, built.state[name], rtol=0, atol=1e-7 if shifted else 0, err_msg=name)


# Not model properties: where the config came from, and the unknown token's id (the tokenizer, which
# pissa writes beside the config, carries it).
BOOKKEEPING = {"_name_or_path", "_model_name_or_path", "architectures", "transformers_version", "dtype",
               "torch_dtype", "unk_token_id"}


def test_config_equals_transformers(built, tmp_path):
    from transformers import AutoConfig

    from pissa.files.formats.hf import model_config

    config = model_config(built.ours.config, "float32")  # what pissa init writes
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = AutoConfig.from_pretrained(tmp_path).to_dict()
    ref = AutoConfig.from_pretrained(built.path.parent, gguf_file=built.path.name).to_dict()
    if built.case.gguf_arch == "gemma3":
        # mlx-lm's key for the every-sixth-layer pattern; transformers keeps it as _sliding_window_pattern.
        assert ours.pop("sliding_window_pattern") == ours["_sliding_window_pattern"] == ref["_sliding_window_pattern"]
    if built.case.gguf_arch == "phi3":
        # transformers' GGUF loading drops Phi-3's sliding window; llama.cpp and the checkpoint keep it.
        assert ours.pop("sliding_window") == 2047 and ref.pop("sliding_window") is None
    keys = (set(ours) | set(ref)) - BOOKKEEPING
    assert {k: ours.get(k) for k in keys} == {k: ref.get(k) for k in keys}
    assert config["architectures"] == [type(built.ref).__name__]


def test_config_reads_alike_in_mlx_lm(built):
    pytest.importorskip("mlx.core")
    import importlib

    from mlx_lm.utils import MODEL_REMAPPING

    config = built.ours.config
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(config['model_type'], config['model_type'])}")
    args = module.ModelArgs.from_dict(config)
    # The checkpoint's base (Gemma 3: the global layers'; Gemma 2 states none, and both default to 1e4).
    assert args.rope_theta == {"mistral": 1e6, "qwen2": 1e6, "qwen3": 1e6, "gemma2": 1e4, "gemma3": 1e6,
                               "phi3": 1e4}[built.ours.path.stem]
    for key in ("query_pre_attn_scalar", "rope_local_base_freq", "sliding_window_pattern", "head_dim",
                "tie_word_embeddings"):
        if hasattr(args, key) and key in config:
            assert getattr(args, key) == config[key], key


TEXTS = ["the", "hello there", " in the thin", "  the  heat", "xyz\nthe"]


def test_tokenizer_equals_transformers(built, tmp_path):
    from transformers import AutoTokenizer

    built.ours.save_tokenizer(tmp_path)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    ref = AutoTokenizer.from_pretrained(built.path.parent, gguf_file=built.path.name)
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ref(text).input_ids) == ref.decode(ref(text).input_ids), text


@pytest.mark.slow  # 1-2 s each alone, up to 8 s on shared cores
def test_pissa_init_reproduces_the_gguf_model(built, tmp_path):
    """The residual folder plus its adapter compute the GGUF model's logits, in transformers and mlx-lm."""
    from pissa import AdapterSpec
    from pissa.jobs.init import run_init
    from pissa_torch import load

    run_init(str(built.path), tmp_path / "out", AdapterSpec(rank=4), backend="numpy", progress=False)
    ids = [[5, 17, 40, 3, 99, 200, 7, 64]]
    with torch.no_grad():
        want = built.ref(torch.tensor(ids)).logits.numpy()
        model, _ = load(tmp_path / "out")
        got = model(torch.tensor(ids)).logits.numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 5e-6 * scale  # measured: at most 7e-7 relative, every architecture
    mx = pytest.importorskip("mlx.core")
    from pissa_mlx import load as mlx_load

    mlx_model, _ = mlx_load(tmp_path / "out")
    got_mlx = np.array(mlx_model(mx.array(ids)))
    assert np.abs(got_mlx - want).max() <= 5e-6 * scale  # measured: at most 8e-7


# --- What pissa refuses, one line each -------------------------------------------------------

def small_gguf(path: Path, arch: str, tensors: dict[str, tuple[int, ...]], **meta) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for k, v in {"block_count": 46, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
                 "attention.head_count": 4, "attention.layer_norm_rms_epsilon": 1e-6, **meta}.items():
        w.add_float32(f"{arch}.{k}", v) if isinstance(v, float) else (
            w.add_string(f"{arch}.{k}", v) if isinstance(v, str) else w.add_uint32(f"{arch}.{k}", v))
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    finish(w)
    return path


def test_gemma_27b_attention_scale(tmp_path):
    # 46 layers is Gemma 2 27B (62: Gemma 3 27B): llama.cpp scales queries by hidden / heads there.
    embd = {"token_embd.weight": (8, 64)}
    src = GGUFSource(small_gguf(tmp_path / "g2.gguf", "gemma2", embd, **{"attention.key_length": 128}))
    assert src.config["query_pre_attn_scalar"] == 16 and src.config["head_dim"] == 128
    src = GGUFSource(small_gguf(tmp_path / "g3.gguf", "gemma3", embd, block_count=26,
                                **{"attention.key_length": 256}))
    assert src.config["query_pre_attn_scalar"] == 256


def test_qwen3_head_dim_comes_from_the_file(tmp_path):
    src = GGUFSource(small_gguf(tmp_path / "q3.gguf", "qwen3", {"token_embd.weight": (8, 64)},
                                **{"attention.key_length": 48}))
    assert src.config["head_dim"] == 48  # transformers 5.24 would take 128 and fail to load the weights


@pytest.mark.parametrize("arch, tensors, meta, words", [
    ("qwen2", {}, {"rope.scaling.type": "yarn"}, "uses 'yarn' rope scaling"),
    ("gemma3", {}, {"rope.scaling.type": "linear"}, "uses 'linear' rope scaling"),
    ("phi3", {"rope_factors_long.weight": (8,)}, {}, "no Hugging Face phi3 name: rope_factors_long.weight"),
    ("phi3", {}, {"rope.dimension_count": 12}, "rotates 12 of each head's 16 dimensions"),
    ("gemma2", {"output.weight": (8, 64)}, {}, "no Hugging Face gemma2 name: output.weight"),
    ("qwen3", {"blk.0.attn_output.bias": (64,)}, {}, "no Hugging Face qwen3 name: blk.0.attn_output.bias"),
])
def test_refused(tmp_path, arch, tensors, meta, words):
    path = small_gguf(tmp_path / "x.gguf", arch, {"token_embd.weight": (8, 64), **tensors}, **meta)
    with pytest.raises(PissaError) as e:
        GGUFSource(path)
    assert words in str(e.value) and "\n" not in str(e.value)
