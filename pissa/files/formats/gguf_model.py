"""Whole models as GGUF files that llama.cpp, Ollama and LM Studio run with nothing else: what
llama.cpp's convert_hf_to_gguf.py writes for each architecture in gguf_archs.ARCHS (metadata,
tensor names, row order, the tokenizer). numpy and the `gguf` package only.

The metadata is the inverse of gguf_archs.build_config: the keys pissa's reader and transformers'
GGUF loading read, from the same config fields. What llama.cpp fixes in its own code rather than
reading (Gemma's attention scale and the sliding layers' rope base, Phi-3's full rotary) is
checked instead, and a config that differs is refused, as is rope scaling, which needs tensors
(rope_freqs) and keys pissa does not write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from pissa.errors import PissaError
from pissa.files.formats import gguf_tokenizer
from pissa.files.formats.gguf_write import (arch_of, file_type, gguf_name, permute_rows, qtype, tensor_type,
                                            write_gguf)
from pissa.files.loaders.gguf_archs import ARCHS


def _refuse(arch: str, what: str) -> PissaError:
    return PissaError(f"this {arch} model has {what}, which pissa does not write as GGUF; write a Hugging Face "
                      "folder instead (pissa merge ... --out DIR) and convert it with llama.cpp's "
                      "convert_hf_to_gguf.py")


def _rope_theta(arch: str, c: Mapping) -> float:
    """The rope base, after refusing rope scaling (and, for Gemma 3, a local base llama.cpp does not use)."""
    rope = c.get("rope_parameters") or {}
    per_type = rope if arch == "gemma3" and "full_attention" in rope else {"full_attention": rope}
    for layer_type, params in per_type.items():
        kind = (params or {}).get("rope_type", "default")
        if kind != "default":
            raise _refuse(arch, f"{kind!r} rope scaling")
    scaling = c.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise _refuse(arch, f"{scaling.get('rope_type', scaling.get('type'))!r} rope scaling")
    if arch == "gemma3":
        local = (per_type.get("sliding_attention") or {}).get("rope_theta", c.get("rope_local_base_freq", 10000.0))
        if float(local) != 10000.0:
            raise _refuse(arch, f"a sliding-window rope base of {local:g} (llama.cpp uses 10000)")
    theta = per_type["full_attention"].get("rope_theta") if per_type.get("full_attention") else None
    return float(theta if theta is not None else c.get("rope_theta", ARCHS[arch].default_theta))


def model_metadata(arch: str, c: Mapping) -> dict[str, object]:
    """The architecture's `<arch>.*` keys for config.json's fields `c`, as the converter writes them.

    Raises:
        PissaError: a model llama.cpp would run differently from transformers (see the module docstring).
    """
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    keys: dict[str, object] = {
        "context_length": int(c["max_position_embeddings"]),
        "embedding_length": int(c["hidden_size"]),
        "block_count": int(c["num_hidden_layers"]),
        "feed_forward_length": int(c["intermediate_size"]),
        "attention.head_count": heads,
        "attention.head_count_kv": int(c.get("num_key_value_heads") or heads),
        "attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
        "rope.freq_base": _rope_theta(arch, c),
    }
    if c.get("head_dim"):
        keys.update({"attention.key_length": head_dim, "attention.value_length": head_dim})
    if arch == "llama":
        keys.update({"rope.dimension_count": head_dim, "vocab_size": int(c["vocab_size"])})
    elif arch == "phi3":
        rope = c.get("rope_parameters") or {}
        partial = float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise _refuse(arch, f"partial rotary embeddings (factor {partial:g})")
        keys["rope.dimension_count"] = head_dim
        if c.get("sliding_window"):
            keys["attention.sliding_window"] = int(c["sliding_window"])
        if c.get("original_max_position_embeddings"):
            keys["rope.scaling.original_context_length"] = int(c["original_max_position_embeddings"])
    elif arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1 / sqrt(head_dim), but by hidden / heads in the 27B models,
        # which it knows by their layer count (46, 62); a config asking for another scale runs wrong.
        layers_27b = {"gemma2": 46, "gemma3": 62}[arch]
        want = c["hidden_size"] // heads if c["num_hidden_layers"] == layers_27b else head_dim
        if int(c.get("query_pre_attn_scalar", want)) != want:
            raise _refuse(arch, f"query_pre_attn_scalar {c['query_pre_attn_scalar']} (llama.cpp uses {want} here)")
        keys["attention.sliding_window"] = int(c.get("sliding_window") or 4096)
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if c.get(cap) is not None:
                keys[cap] = float(c[cap])
            elif arch == "gemma2":  # llama.cpp caps Gemma 2 unless the file says otherwise
                raise _refuse(arch, f"no {cap}")
    return {f"{arch}.{k}": v for k, v in keys.items()}


def plan(arch: str, config: Mapping, shapes: Mapping[str, tuple[int, ...]], gguf_type: str):
    """[(GGUF name, shape, type)] and the Hugging Face names they come from, in `shapes` order; a
    tied lm_head is left out (llama.cpp reuses the embedding).

    Raises:
        PissaError: tensors the architecture's GGUF has no name for (every one listed).
    """
    tied = config.get("tie_word_embeddings", False) or arch == "gemma2"
    names = [n for n in shapes if not (n == "lm_head.weight" and tied)]
    unknown = [n for n in names if gguf_name(arch, n) is None]
    if unknown:
        raise _refuse(arch, f"{len(unknown)} tensor(s) llama.cpp's {arch} has no place for "
                            f"({', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''})")
    qtype(gguf_type)  # an unknown type is refused before anything is read
    rows = [(gguf_name(arch, n), tuple(shapes[n])) for n in names]
    return [(g, s, tensor_type(g, s, gguf_type)) for g, s in rows], names


def to_stored(arch: str, config: Mapping, name: str, w: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor as the GGUF stores it: llama's q/k rows interleaved, Gemma's norms + 1."""
    a = ARCHS[arch]
    if a.permute_qk and name.endswith("self_attn.q_proj.weight"):
        return permute_rows(w, int(config["num_attention_heads"]))
    if a.permute_qk and name.endswith("self_attn.k_proj.weight"):
        return permute_rows(w, int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    if a.norm_shift and name.endswith("norm.weight"):
        return w.astype(np.float32) + np.float32(a.norm_shift)  # in float32, as the reader undoes it
    return w


def write_model_gguf(out: str | Path, source, weights: Iterable[tuple[str, np.ndarray]], gguf_type: str = "f16",
                     force: bool = False) -> int:
    """Write a model as one GGUF file (atomically). Returns the tensors written.

    Args:
        out: the .gguf file.
        source: the pissa.files.loaders ModelSource the model comes from: its config, shapes and
            tokenizer (a GGUF file's own tokenizer metadata, or the folder's tokenizer).
        weights: (Hugging Face name, float32 array) for every tensor of source.shapes(), in that
            order (the merged weights); consumed one at a time.
        gguf_type: f32, f16 (the converter's default), bf16 or q8_0.
        force: replace an existing non-empty file.

    Raises:
        PissaError: an architecture, config, tensor or tokenizer GGUF cannot hold as llama.cpp runs
            it, an unknown type, or an existing output without force; all checked before writing.
    """
    import gguf

    config = source.config
    arch = arch_of(config)
    keys = model_metadata(arch, config)
    shapes = source.shapes()
    rows, names = plan(arch, config, shapes, gguf_type)
    n_vocab = shapes["model.embed_tokens.weight"][0]
    if hasattr(source, "tokenizer_fields"):  # a GGUF file: its own tokenizer, as it was
        vocab = gguf_tokenizer.from_gguf(source.tokenizer_fields())
    else:
        from pissa.files.tokenizer import load_tokenizer

        vocab = gguf_tokenizer.from_hf(load_tokenizer(source.path), n_vocab)

    def metadata(w) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(Path(out).stem)
        for key, value in keys.items():
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
        w.add_file_type(file_type(gguf_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype, sub in vocab:
            w.add_key_value(key, value, vtype, sub)

    keep = set(names)
    arrays = (to_stored(arch, config, n, w) for n, w in weights if n in keep)
    write_gguf(Path(out), arch, metadata, rows, arrays, force)
    return len(rows)
