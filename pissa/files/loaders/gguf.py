"""GGUF (llama.cpp) models: Hugging Face names and layout, dequantised to float32.

The layout conversions happen here and nowhere else:
- ggml lists dimensions fastest-first; reversed, they are Hugging Face's [out, in].
- llama.cpp's llama converter permutes the rows of q_proj and k_proj (within each head, it
  interleaves the two rotary halves, for its rope kernel). We undo it, as transformers does when it
  loads a GGUF; without that, the model still runs but attention is silently wrong.
- Gemma's converter stores every RMSNorm weight as w + 1; we subtract the 1 again.
Which architecture needs which, and its names and config, is the table in gguf_archs.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pissa.errors import PissaError
from pissa.files.formats.safetensors import release_pages
from pissa.files.layouts import Layout
from pissa.files.loaders.gguf_archs import ARCHS, Meta, build_config
from pissa.files.loaders.gguf_archs import hf_name as arch_hf_name
from pissa.files.loaders.hf import DEQUANTIZED_DTYPE

# The types the embedded SmolLM2 file uses (Q4_1, Q8_0, F32) and the common plain ones. Others
# (K-quants, IQ types) would need their own dequantisation checks against transformers.
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # GGUF type -> storage dtype

# Tokenizer metadata, under the names transformers' GGUF tokenizer builders read.
_TOKENIZER_KEYS = {
    "model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
    "token_type": "token_type", "merges": "merges", "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space",
}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name for a GGUF tensor name of `arch`, or None if that model has no such tensor."""
    return arch_hf_name(ARCHS[arch], gguf_name)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave of a q or k weight [n_head * head_dim, in].

    llama.cpp wrote w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2); this is its inverse.
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _readable() -> str:
    return ", ".join(f"{name} (also Mistral)" if name == "llama" else name for name in ARCHS)


class GGUFSource:
    """A GGUF file of an architecture in gguf_archs.ARCHS, read through a memory map one tensor at a time.

    Args:
        path: the .gguf file.

    Raises:
        PissaError: when the file is truncated or corrupt, is of an architecture pissa does not read,
            holds a tensor of a type outside SUPPORTED or one its architecture has no name for, or
            uses rope scaling. All are checked here, before any tensor is read.
    """

    layout = Layout()  # the loader already gives Hugging Face names, [out, in]

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
            self._fields = self._reader.fields
            arch = self._value("general.architecture")
        except (OSError, ValueError, KeyError, IndexError, TypeError, MemoryError, OverflowError) as e:
            raise PissaError(f"{self.path} is truncated or corrupt ({e}); re-download it") from None
        if arch not in ARCHS:
            raise PissaError(f"{self.path} is a GGUF of architecture {arch!r}, which pissa does not read; it reads "
                             f"{_readable()}, so use the model's Hugging Face folder instead")
        self.arch = arch
        self._arch = ARCHS[arch]
        self._tensors = {}
        bad_type, unknown = [], []
        for t in self._reader.tensors:
            if t.tensor_type.name not in SUPPORTED:
                bad_type.append(f"{t.name} ({t.tensor_type.name})")
            name = arch_hf_name(self._arch, t.name)
            if name is None:
                unknown.append(t.name)
            else:
                self._tensors[name] = t
        if bad_type:
            raise PissaError(f"{self.path}: {len(bad_type)} tensors have unsupported GGUF types: "
                             f"{_listing(bad_type)}; pissa reads {', '.join(SUPPORTED)}, so use a GGUF of "
                             "one of those types or the model's Hugging Face folder")
        if unknown:
            raise PissaError(f"{self.path}: {len(unknown)} tensors have no Hugging Face {arch} name: "
                             f"{_listing(unknown)}; pissa reads plain {arch} GGUF files only, so use the "
                             "model's Hugging Face folder instead")
        meta = Meta(arch, self._value, self.shapes(), self.path)
        self._n_head = meta.need("attention.head_count")
        self._n_kv = meta.get("attention.head_count_kv", self._n_head)
        scaling = meta.get("rope.scaling.type", "none")
        if scaling != "none":
            raise PissaError(f"{self.path} uses {scaling!r} rope scaling, which pissa does not convert; "
                             "use the model's Hugging Face folder instead")
        self.config = build_config(self._arch, meta)
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            if (token := self._value(f"tokenizer.ggml.{key}")) is not None:
                self.config[key.replace("padding", "pad")] = token
        self.generation_config = {k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                  if k in self.config}

    def _value(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()}

    @property
    def storage_dtype(self) -> str:
        if any(t.tensor_type.name not in _FLOAT_TYPES for t in self._tensors.values()):
            return DEQUANTIZED_DTYPE  # quantised tensors are dequantised on read
        sizes: dict[str, int] = {}
        for t in self._tensors.values():
            kind = _FLOAT_TYPES[t.tensor_type.name]
            sizes[kind] = sizes.get(kind, 0) + int(t.n_elements)
        return max(sizes, key=sizes.get)

    def release(self) -> None:
        release_pages(self._reader.data)

    def stored(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        reordered = self._arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))
        shifted = self._arch.norm_shift and name.endswith("norm.weight")
        if t.tensor_type.name in ("F32", "F16") and not (reordered or shifted):
            return t.data.reshape(tuple(int(d) for d in reversed(t.shape)))  # the file's memory map
        return self.get(name)

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if self._arch.permute_qk and name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, self._n_head)
        elif self._arch.permute_qk and name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, self._n_kv)
        elif self._arch.norm_shift and name.endswith("norm.weight"):
            w = w - np.float32(self._arch.norm_shift)  # in float32, as transformers undoes it
        return np.array(w, dtype=np.float32)  # a writable copy, not a view of the file

    def tokenizer_fields(self) -> dict:
        """The file's metadata fields (gguf.ReaderField by key), for writing its tokenizer into
        another GGUF as it is (pissa.files.formats.gguf_tokenizer.from_gguf)."""
        return dict(self._fields)

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        """Write the tokenizer that transformers builds from this file's metadata.

        The result loads with AutoTokenizer.from_pretrained(out_dir) and gives the same ids and chat
        template as AutoTokenizer.from_pretrained(folder, gguf_file=name). It uses transformers'
        own GGUF tokenizer builders, whose module does not import torch.

        Raises:
            PissaError: when the file has no tokenizer, transformers is too old to have those
                builders, or the file's tokenizer type is one it cannot build.
        """
        try:
            from transformers import PreTrainedTokenizerFast
            from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
        except ImportError:
            # The builders moved to integrations.gguf in transformers 5 (5.23 is what we test).
            raise PissaError("writing a GGUF model's tokenizer needs a newer transformers than the one "
                             "installed; run: pip install -U transformers") from None
        tokenizer_dict = {name: self._value(f"tokenizer.ggml.{key}") for key, name in _TOKENIZER_KEYS.items()
                          if f"tokenizer.ggml.{key}" in self._fields}
        if "tokens" not in tokenizer_dict:
            raise PissaError(f"{self.path} has no tokenizer in its metadata; "
                             "pass the model's Hugging Face folder instead")
        # The tokenizer_config transformers derives from the same metadata (get_gguf_tokenizer).
        kwargs = {name: self._value(key) for key, name in (
            ("tokenizer.chat_template", "chat_template"), ("tokenizer.ggml.add_bos_token", "add_bos_token"),
            ("tokenizer.ggml.add_eos_token", "add_eos_token")) if key in self._fields}
        if tokenizer_dict.get("tokenizer_type") == "llama":
            kwargs.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
        for special, key in _SPECIAL.items():
            token_id = self._value(f"tokenizer.ggml.{key}")
            kwargs[special] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
        try:
            # The architecture picks the builder: Gemma and Phi-3 sentencepiece vocabularies need their own.
            backend, extra = convert_gguf_tokenizer(self.arch, tokenizer_dict)
        except ValueError as e:
            raise PissaError(f"{self.path}: {e}; pass the model's Hugging Face folder instead") from None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs, **extra)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = tokenizer.save_pretrained(out_dir)
        return sorted({Path(p).name for p in written if Path(p).is_file()})


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
