"""LoRA adapters as llama.cpp reads them (`llama-cli -m BASE.gguf --lora LORA.gguf`), written as
llama.cpp's convert_lora_to_gguf.py writes them. numpy and the `gguf` package only.

What llama.cpp reads (llama-adapter.cpp, llama-graph.cpp):
- general.type "adapter", adapter.type "lora", adapter.lora.alpha (float32), and
  general.architecture, which must be the base model's;
- per adapted weight, "<its GGUF name>.lora_a" = A [r, in] and ".lora_b" = B [out, r] (numpy
  shapes, PEFT's orientation);
- the update is (alpha / r) * B @ A with r read from B. So rsLoRA's alpha / sqrt(r), or any other
  scale, is folded into the factors (half of it into each), and alpha stays the adapter's own;
- the converter runs the base model's tensor transforms on the pair; of them only llama's q/k row
  interleave touches a linear weight, and it moves B's rows (A's columns are the input's, untouched).
No DoRA magnitude and no MoRA matrix: those kinds have no file here (use `pissa merge`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from pissa.adapters.adapter import Adapter
from pissa.errors import PissaError
from pissa.files.formats.gguf_write import (arch_of, file_type, gguf_name, permute_rows, tensor_type,
                                            write_gguf)
from pissa.files.loaders.gguf_archs import ARCHS


def lora_tensors(adapter: Adapter, config: Mapping) -> tuple[str, float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(architecture, alpha, {GGUF base name: (A [r, in], B [out, r])}) of a plain LoRA, float32, in
    llama.cpp's names and row order, with alpha / r * B @ A equal to the adapter's s * B @ A.

    Args:
        adapter: a plain LoRA (kind "lora"; `pissa convert`'s result, or a trained PiSSA adapter
            for the GGUF of its residual model).
        config: the base model's config.json fields (architecture, attention heads, tied embeddings).

    Raises:
        PissaError: an adapter of another kind (DoRA, MoRA), an architecture GGUF does not hold, or
            modules that have no tensor in that architecture's GGUF (every one listed).
    """
    spec = adapter.spec
    if spec.kind != "lora":
        raise PissaError(f"llama.cpp's LoRA files hold plain LoRA adapters, not {spec.kind}; merge it into the model "
                         "and serve that: pissa merge MODEL_DIR --adapter ADAPTER --out MERGED.gguf")
    arch = arch_of(config)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tied = bool(config.get("tie_word_embeddings", False))
    names = {m: gguf_name(arch, m + ".weight") for m in adapter.factors}
    missing = sorted(m for m, n in names.items() if n is None or (n == "output.weight" and tied))
    if missing:
        raise PissaError(f"{len(missing)} adapted module(s) have no weight of their own in a llama.cpp {arch} GGUF: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; llama.cpp cannot apply "
                         "a LoRA there, so merge instead: pissa merge MODEL_DIR --adapter ADAPTER --out MERGED.gguf")
    out = {}
    for m, (A, B) in adapter.factors.items():
        # llama.cpp multiplies by alpha / r (this module's r, from its tensors; one alpha for all):
        # half of what else the module's scale holds goes into each factor.
        own = spec.for_module(m)
        fold = math.sqrt(own.scale * own.rank / spec.alpha)
        A = A.astype(np.float64) * fold
        B = B.astype(np.float64) * fold
        if ARCHS[arch].permute_qk and m.endswith("self_attn.q_proj"):
            B = permute_rows(B, heads)
        elif ARCHS[arch].permute_qk and m.endswith("self_attn.k_proj"):
            B = permute_rows(B, kv_heads)
        out[names[m]] = (A.astype(np.float32), B.astype(np.float32))
    return arch, float(spec.alpha), out


def save_lora_gguf(path: str | Path, adapter: Adapter, config: Mapping, gguf_type: str = "f32",
                   force: bool = False) -> int:
    """Write `adapter` as a llama.cpp LoRA GGUF at `path` (atomically). Returns the tensors written.

    Args:
        path: the .gguf file.
        adapter, config: as for lora_tensors.
        gguf_type: f32 (the converter's default), f16, bf16 or q8_0.
        force: replace an existing non-empty file.

    Raises:
        PissaError: as lora_tensors, an unknown gguf_type, or an existing output without force;
            nothing is written then.
    """
    arch, alpha, tensors = lora_tensors(adapter, config)
    plan, arrays = [], []
    for base, (A, B) in tensors.items():
        for suffix, a in ((".lora_a", A), (".lora_b", B)):
            plan.append((base + suffix, a.shape, tensor_type(base + suffix, a.shape, gguf_type)))
            arrays.append(a)

    def metadata(w) -> None:
        from gguf import GGML_QUANT_VERSION, GGUFType, Keys

        w.add_type(GGUFType.ADAPTER)
        w.add_string(Keys.Adapter.TYPE, "lora")
        w.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(Path(path).stem)
        w.add_file_type(file_type(gguf_type))
        w.add_quantization_version(GGML_QUANT_VERSION)

    write_gguf(Path(path), arch, metadata, plan, arrays, force)
    return len(plan)
