"""The GGUF architectures pissa reads, as one table: llama.cpp's names and conventions per architecture.

Each entry says, for one `general.architecture`, what llama.cpp's convert_hf_to_gguf.py did to the
Hugging Face checkpoint, so that the loader can undo exactly that:
- tensor names: llama.cpp's leaf names ("blk.N.attn_q.weight") against transformers' module paths;
- `permute_qk`: llama's converter interleaves the two rotary halves of each q/k head's rows for
  its rope kernel (qwen2, qwen3, gemma and phi3 use the NEOX layout and store rows as they are);
- `norm_shift`: Gemma's RMSNorm scales by (1 + w); its converter stores w + 1 in every
  "...norm.weight", so the loader subtracts it again;
- fused tensors stay fused where transformers' class is fused too (phi3's qkv_proj, gate_up_proj);
- the config: the metadata keys and the defaults transformers' own GGUF loading uses
  (transformers/integrations/ggml.py, modeling_gguf_pytorch_utils.py, 5.24), written so that
  transformers and mlx-lm both read it (the rope base also at the top level: mlx-lm reads only
  that key and otherwise silently uses its own default).

Where transformers' GGUF loading is knowingly lossy, the config follows llama.cpp's runtime,
which is what ran the file: Gemma's 27B attention scale and Phi-3's sliding window (see below).
Mistral files are llama files: llama.cpp writes MistralForCausalLM as architecture "llama", and
transformers loads them as llama too. tests/test_gguf_archs.py checks every entry against
transformers, tensor for tensor and config key for key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from pissa.errors import PissaError

_ATTN = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight"}
_MLP = {"ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight"}
_LLAMA_NORMS = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
_QK_NORMS = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
# Gemma 2 and 3 have four norms per block; llama.cpp's "ffn_norm" is the one before the MLP.
_GEMMA_NORMS = {"attn_norm.weight": "input_layernorm.weight",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


class Meta:
    """The metadata of one file under its architecture's prefix ("qwen2.block_count"), with its shapes."""

    def __init__(self, arch: str, value: Callable, shapes: Mapping[str, tuple[int, ...]], path):
        self.arch, self._value, self.shapes, self.path = arch, value, shapes, path

    def get(self, key: str, default=None):
        return self._value(f"{self.arch}.{key}", default)

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise PissaError(f"{self.path} lacks the metadata key {self.arch}.{key} that every {self.arch} GGUF "
                             "has; re-download it or use the model's Hugging Face folder")
        return value


@dataclass(frozen=True)
class Arch:
    """How one llama.cpp architecture maps onto its transformers model."""

    model_type: str                       # transformers' model_type
    hf_class: str                         # config.json "architectures"
    block: Mapping[str, str]              # "attn_q.weight" -> "self_attn.q_proj.weight" within model.layers.N
    extra_config: Callable[[Meta, dict], dict]  # fields beyond base_config's; may drop ones its class lacks
    top: Mapping[str, str] = field(default_factory=lambda: _TOP)
    permute_qk: bool = False
    norm_shift: float = 0.0
    default_theta: float = 10000.0        # transformers' class default where the file states no rope base


def base_config(arch: Arch, m: Meta) -> dict:
    """The fields every entry shares, read as transformers reads them."""
    hidden = m.need("embedding_length")
    heads = m.need("attention.head_count")
    q = m.shapes.get("model.layers.0.self_attn.q_proj.weight", (hidden,))
    theta = float(m.get("rope.freq_base", arch.default_theta))
    vocab = m.shapes["model.embed_tokens.weight"][0] if "model.embed_tokens.weight" in m.shapes else None
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": m.need("feed_forward_length"),
        "num_hidden_layers": m.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": m.get("attention.head_count_kv", heads),
        "head_dim": m.get("attention.key_length", q[0] // heads),
        "max_position_embeddings": m.need("context_length"),
        "rms_norm_eps": float(m.need("attention.layer_norm_rms_epsilon")),
        # Both spellings: transformers 5 reads rope_parameters, mlx-lm only the top-level key.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": vocab or m.need("vocab_size"),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "lm_head.weight" not in m.shapes,
    }


def _llama(m: Meta, c: dict) -> dict:
    return {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _qwen2(m: Meta, c: dict) -> dict:
    # Qwen2's q/k/v biases are tensors in the file; its config class has no head_dim (it is always
    # hidden / heads) and no bias flag.
    del c["head_dim"]
    return {"hidden_act": "silu"}


def _qwen3(m: Meta, c: dict) -> dict:
    # head_dim comes from attention.key_length (128 in every Qwen3, and not hidden / heads there).
    # transformers 5.24 ignores that key for qwen3 and uses its class default 128, which agrees.
    return {"hidden_act": "silu", "attention_bias": False}


def _gemma_scale(m: Meta, c: dict, layers_27b: int) -> int:
    # GGUF stores no query_pre_attn_scalar. llama.cpp's runtime scales queries by head_dim, except in
    # the 27B models (recognised by their layer count), where it uses hidden / heads (144 and 168).
    # transformers' GGUF loading always takes its default 256, right only where head_dim is 256.
    if c["num_hidden_layers"] == layers_27b:
        return c["hidden_size"] // c["num_attention_heads"]
    return c["head_dim"]


def _gemma2(m: Meta, c: dict) -> dict:
    layers = c["num_hidden_layers"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": _gemma_scale(m, c, 46),
        "sliding_window": m.get("attention.sliding_window", 4096),
        # Gemma 2 alternates, starting with a sliding layer (llama.cpp and transformers alike).
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "attn_logit_softcapping": float(m.get("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(m.get("final_logit_softcapping", 30.0)),
    }


def _gemma3(m: Meta, c: dict) -> dict:
    layers, theta = c["num_hidden_layers"], c["rope_theta"]
    final_cap = m.get("final_logit_softcapping")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "query_pre_attn_scalar": _gemma_scale(m, c, 62),
        "sliding_window": m.get("attention.sliding_window", 4096),
        # Every sixth layer is global, the others slide: fixed in llama.cpp, transformers and mlx-lm.
        # mlx-lm reads the pattern, transformers the list.
        "sliding_window_pattern": 6,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        # The file's rope base is the global layers' one; the sliding layers use 10000 (hard-coded
        # in llama.cpp). mlx-lm reads rope_theta and rope_local_base_freq.
        "rope_local_base_freq": 10000.0,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": theta}},
        "final_logit_softcapping": None if final_cap is None else float(final_cap),
        "attn_logit_softcapping": None,
    }


def _phi3(m: Meta, c: dict) -> dict:
    head_dim = c.pop("head_dim")  # Phi3Config has no such field: it is hidden / heads
    rope_dims = m.get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise PissaError(f"{m.path} rotates {rope_dims} of each head's {head_dim} dimensions (partial rotary), "
                         "which transformers' GGUF loading does not keep and pissa does not convert; "
                         "use the model's Hugging Face folder instead")
    c["rope_parameters"]["partial_rotary_factor"] = 1.0
    extra = {"hidden_act": "silu"}
    # transformers' GGUF loading drops the window; llama.cpp (and the original Phi-3 config, 2047)
    # keep it, so it is kept here. 0 means none (Phi-4).
    if window := m.get("attention.sliding_window", 0):
        extra["sliding_window"] = window
    return extra


# general.architecture -> entry. Order is the order error messages list them in.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LlamaForCausalLM", {**_ATTN, **_MLP, **_LLAMA_NORMS}, _llama, permute_qk=True),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM",
                  {**_ATTN, **_MLP, **_LLAMA_NORMS, "attn_q.bias": "self_attn.q_proj.bias",
                   "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias"}, _qwen2),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", {**_ATTN, **_MLP, **_LLAMA_NORMS, **_QK_NORMS}, _qwen3),
    # llama.cpp never writes output.weight for Gemma 2, and transformers maps none.
    "gemma2": Arch("gemma2", "Gemma2ForCausalLM", {**_ATTN, **_MLP, **_GEMMA_NORMS}, _gemma2,
                   top={k: v for k, v in _TOP.items() if k != "output.weight"}, norm_shift=1.0),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM", {**_ATTN, **_MLP, **_GEMMA_NORMS, **_QK_NORMS}, _gemma3,
                   norm_shift=1.0, default_theta=1_000_000.0),
    # Phi-3 keeps q, k, v in one matrix and gate, up in another (llama.cpp calls the latter ffn_up).
    "phi3": Arch("phi3", "Phi3ForCausalLM",
                 {"attn_qkv.weight": "self_attn.qkv_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                  "ffn_up.weight": "mlp.gate_up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
                  **_LLAMA_NORMS}, _phi3),
}

def hf_name(arch: Arch, gguf_name: str) -> str | None:
    """The transformers name of a GGUF tensor under `arch`, or None if that model has no such tensor."""
    if gguf_name.startswith("blk."):
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2] in arch.block:
            return f"model.layers.{parts[1]}.{arch.block[parts[2]]}"
        return None
    return arch.top.get(gguf_name)


def build_config(arch: Arch, m: Meta) -> dict:
    config = base_config(arch, m)
    config.update(arch.extra_config(m, config))
    return config
