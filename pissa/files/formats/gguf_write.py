"""Writing GGUF files (llama.cpp), the parts a model and a LoRA adapter share: the output types,
names and row order, and the streamed, atomic write. numpy and the `gguf` package only.

Writing is the inverse of reading (pissa.files.loaders.gguf, gguf_archs.ARCHS is the one table of
names and conventions); the rules below are those of llama.cpp's convert_hf_to_gguf.py:
- a tensor's GGUF name is its ARCHS name ("model.layers.3.self_attn.q_proj.weight" ->
  "blk.3.attn_q.weight"); numpy shapes are written as they are (the writer lists them fastest-first);
- llama's q_proj / k_proj rows are interleaved per head for its rope kernel (permute_rows; the
  reader's unpermute_rows undoes it); Gemma's norms are stored as w + 1;
- every vector, every "*_norm.weight" and every tensor that is not a weight (a bias) stays float32
  whatever the file type; Q8_0 needs rows of whole 32-value blocks, and a tensor whose rows are not
  falls back to F16, as the converter does.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pissa.errors import PissaError
from pissa.files.loaders.gguf_archs import ARCHS

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# transformers' model_type -> general.architecture. llama.cpp writes Mistral as llama.
_ARCH_OF = {**{a.model_type: name for name, a in ARCHS.items()}, "mistral": "llama"}
_REVERSE = {name: ({hf: leaf for leaf, hf in a.block.items()}, {hf: top for top, hf in a.top.items()})
            for name, a in ARCHS.items()}


def readable_archs() -> str:
    return "llama (Llama, Mistral, SmolLM2), qwen2, qwen3, gemma2, gemma3 (text) and phi3"


def arch_of(config: Mapping) -> str:
    """The GGUF architecture of a model config (config.json's fields).

    Raises:
        PissaError: for a model_type pissa does not write as GGUF (GPT-2, MoE models, ...).
    """
    model_type = config.get("model_type")
    if model_type not in _ARCH_OF:
        raise PissaError(f"pissa writes GGUF for {readable_archs()}, not model_type {model_type!r}; write a Hugging "
                         "Face folder instead (pissa merge ... --out DIR) and convert it with llama.cpp's "
                         "convert_hf_to_gguf.py")
    return _ARCH_OF[model_type]


def gguf_name(arch: str, hf_name: str) -> str | None:
    """llama.cpp's name of a Hugging Face tensor ("model.layers.0.mlp.up_proj.weight" -> "blk.0.ffn_up.weight")
    under `arch`, or None when the architecture has no such tensor."""
    block, top = _REVERSE[arch]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        leaf = block.get(parts[3])
        return None if leaf is None else f"blk.{parts[2]}.{leaf}"
    return top.get(hf_name)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row interleave of a q or k weight [n_head * head_dim, ...] (or of a LoRA B,
    whose rows are the weight's): within each head, the two rotary halves' rows alternate. The
    inverse of pissa.files.loaders.gguf.unpermute_rows."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qtype(gguf_type: str):
    """The gguf.GGMLQuantizationType of a --gguf-type name.

    Raises:
        PissaError: for a name outside GGUF_TYPES.
    """
    from gguf import GGMLQuantizationType as Q

    if gguf_type not in GGUF_TYPES:
        raise PissaError(f"unknown --gguf-type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]


def file_type(gguf_type: str) -> int:
    """general.file_type (llama.cpp's LlamaFileType) of a file written as `gguf_type`."""
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[gguf_type])


def tensor_type(name: str, shape: Sequence[int], gguf_type: str):
    """The type one tensor is stored in, as the converter chooses it (see the module docstring)."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        return Q.F32
    t = qtype(gguf_type)
    return Q.F16 if t == Q.Q8_0 and shape[-1] % 32 else t


def encode(a: np.ndarray, t) -> np.ndarray:
    """A float32 array in type `t` (F32, F16, BF16 or Q8_0), as gguf.quants stores it."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    a = np.ascontiguousarray(a, dtype=np.float32)
    return a if t == Q.F32 else quantize(a, t)


def stored_nbytes(shape: Sequence[int], t) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def check_out_file(out: Path, force: bool) -> None:
    """Refuse an output that is a folder, or a non-empty file unless force, before any work starts.

    Raises:
        PissaError: naming the path and the fix.
    """
    if out.is_dir():
        raise PissaError(f"--out {out} is a folder; name a .gguf file")
    if out.is_file() and out.stat().st_size > 0 and not force:
        raise PissaError(f"--out {out} exists; choose another file or pass --force to replace it")


@contextmanager
def atomic_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `out`; on success it replaces `out` in one rename. On any
    error the temporary file is removed and `out` is left as it was."""
    out = Path(out).absolute()
    check_out_file(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


Plan = Sequence[tuple[str, tuple[int, ...], object]]  # (GGUF name, numpy shape, GGMLQuantizationType)


def write_gguf(out: Path, arch: str, metadata: Callable, plan: Plan, arrays: Iterable[np.ndarray],
               force: bool = False) -> None:
    """Stream a GGUF file: metadata(writer) adds the key-values, then each tensor of `plan` is
    written as `arrays` yields it (float32, in plan order), so no more than one tensor is held.

    Raises:
        PissaError: see check_out_file; nothing is written then, or on any later error.
    """
    import gguf

    with atomic_file(out, force) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            metadata(w)
            for name, shape, t in plan:
                w.add_tensor_info(name, shape, np.dtype(np.float32), stored_nbytes(shape, t), raw_dtype=t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            count = 0
            for (name, shape, t), a in zip(plan, arrays):
                if tuple(a.shape) != tuple(shape):
                    raise RuntimeError(f"{name}: got shape {a.shape}, planned {shape}")
                w.write_tensor_data(encode(a, t))
                count += 1
        finally:
            w.close()
        if count != len(plan):
            raise RuntimeError(f"wrote {count} of {len(plan)} planned tensors")
