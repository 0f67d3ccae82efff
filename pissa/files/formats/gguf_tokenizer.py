"""A model's tokenizer as GGUF metadata (`tokenizer.ggml.*`), which llama.cpp and Ollama tokenize with.

Two sources. A model read from a GGUF file keeps its file's tokenizer metadata as it was
(copied). A Hugging Face folder's fast tokenizer (its tokenizer.json) is described as llama.cpp's
convert_hf_to_gguf.py describes it, for the two vocabularies the architectures pissa writes use:
- byte-level BPE (Llama 3, Qwen2/3, SmolLM2, Phi-4): model "gpt2", the tokens in id order, the
  merges ("a b"), and "pre", llama.cpp's name for the pre-tokenizer, recognised from the
  tokenizer's split regex (the names transformers' GGUF loading maps back to the same regex);
- sentencepiece BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3): model "llama", the pieces
  with scores that rank them in merge order (llama.cpp merges the best-scored pair first, and
  transformers' GGUF loading rebuilds the merges from the scores), and add_space_prefix.
Token types: CONTROL for special added tokens, USER_DEFINED for other added ones, BYTE for
"<0xNN>" pieces, UNKNOWN for the unknown token, NORMAL for the rest, and UNUSED "[PADn]" tokens up
to the embedding's row count, which llama.cpp requires the vocabulary to match.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pissa.errors import PissaError

# (key, value, GGUFValueType, array element type or None): what GGUFWriter.add_key_value takes.
Field = tuple[str, Any, Any, Any]
_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")
# A byte-level tokenizer's pre-tokenizer, as tokenizer.json writes it, -> llama.cpp's name for it.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def from_gguf(fields: dict[str, Any]) -> list[Field]:
    """The tokenizer metadata of a GGUF file, unchanged: `fields` is GGUFReader.fields."""
    from gguf import GGUFValueType

    out = []
    for key, f in fields.items():
        if key.startswith("tokenizer."):
            vtype = GGUFValueType(f.types[0])
            out.append((key, f.contents(), vtype, GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None))
    return out


def from_hf(tokenizer: Any, n_vocab: int) -> list[Field]:
    """The GGUF tokenizer metadata of a transformers fast tokenizer, for a model of n_vocab embedding rows.

    Raises:
        PissaError: a tokenizer of a kind llama.cpp's BPE and sentencepiece readers do not take
            (unigram, WordPiece, a slow tokenizer), a byte-level pre-tokenizer llama.cpp has no name
            for, or more tokens than embedding rows.
    """
    from gguf import GGUFValueType as V, TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _refuse("it is not a fast tokenizer (no tokenizer.json)")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(f"its model is {model.get('type')!r}, not BPE")
    byte_level = _has_byte_level(spec)
    if not byte_level and not model.get("byte_fallback"):
        raise _refuse("it is BPE without byte-level pieces or byte fallback")
    # An added token past the embedding's rows can never reach the model (transformers' GemmaTokenizer
    # adds a "<mask>" there); it is left out. A piece of the vocabulary there is a wrong tokenizer.
    added = {t["id"]: t for t in spec.get("added_tokens", []) if t["id"] < n_vocab}
    tokens = {**{i: t for t, i in model["vocab"].items()}, **{i: t["content"] for i, t in added.items()}}
    if max(tokens) >= n_vocab:
        raise PissaError(f"the tokenizer's vocabulary has {max(tokens) + 1} tokens but the model's embedding "
                         f"{n_vocab} rows; pass the tokenizer the model was trained with")
    unk = tokenizer.unk_token_id
    names, types = [], []
    for i in range(n_vocab):
        text = tokens.get(i, f"[PAD{i}]")
        if i not in tokens:
            kind = TokenType.UNUSED
        elif i == unk and not byte_level:
            kind = TokenType.UNKNOWN
        elif i in added:
            kind = TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED
        elif not byte_level and _BYTE.match(text):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        names.append(text)
        types.append(int(kind))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    out: list[Field] = [
        ("tokenizer.ggml.model", "gpt2" if byte_level else "llama", V.STRING, None),
        ("tokenizer.ggml.tokens", names, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
    ]
    if byte_level:
        out.append(("tokenizer.ggml.pre", _pre_name(spec), V.STRING, None))
        out.append(("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING))
    else:
        out.append(("tokenizer.ggml.scores", _scores(names, merges), V.ARRAY, V.FLOAT32))
        out.append(("tokenizer.ggml.add_space_prefix", _adds_space_prefix(spec), V.BOOL, None))
    for key, token_id in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                          ("unknown_token_id", unk), ("padding_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            out.append((f"tokenizer.ggml.{key}", int(token_id), V.UINT32, None))
    bos, eos = _adds_bos_eos(tokenizer)
    out.append(("tokenizer.ggml.add_bos_token", bos, V.BOOL, None))
    out.append(("tokenizer.ggml.add_eos_token", eos, V.BOOL, None))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        out.append(("tokenizer.chat_template", tokenizer.chat_template, V.STRING, None))
    return out


def _refuse(why: str) -> PissaError:
    return PissaError(f"pissa cannot describe this tokenizer in GGUF: {why}; write a Hugging Face folder instead "
                      "(pissa merge ... --out DIR) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _pre_tokenizers(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []


def _has_byte_level(spec: dict) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(spec)) or \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"


def _matches(step: dict, want: dict) -> bool:
    return all(step.get(k) == v for k, v in want.items())


def _pre_name(spec: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level pre-tokenizer."""
    steps = _pre_tokenizers(spec)
    if len(steps) == 1 and _matches(steps[0], _GPT2_BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and _matches(steps[0], _DIGITS) and _matches(steps[1], _GPT2_BYTE_LEVEL):
        return "smollm"  # GPT-2's split with each digit alone
    if len(steps) == 2 and steps[0].get("type") == "Split" and _matches(steps[1], {"type": "ByteLevel",
                                                                                  "use_regex": False}):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in _known_splits().items():
            if split == regex:
                return name
    raise _refuse("llama.cpp has no pre-tokenizer name pissa knows for its split "
                  f"({json.dumps(steps)[:120]})")


def _known_splits() -> dict[str, str]:
    """llama.cpp pre-tokenizer name -> split regex, as transformers' GGUF loading maps them (its
    first name for each regex; llama.cpp reads every one of them)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    first: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        first.setdefault(regex, name)
    return {name: regex for regex, name in first.items()}


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Sentencepiece scores that rank each piece by the first merge that makes it (higher merges
    first, as llama.cpp does); pieces no merge makes (characters, bytes, specials) score 0."""
    made: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        made.setdefault(merge.replace(" ", "", 1), rank)
    return [-1.0 - made[t] if t in made else 0.0 for t in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer, or Metaspace's prefix)."""
    text = json.dumps(spec.get("normalizer"))
    if '"Prepend"' in text:
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in _pre_tokenizers(spec))


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS first and EOS last, asked of the tokenizer itself."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (len(ids) > len(bare) and bos is not None and ids[0] == bos,
            len(ids) > len(bare) and eos is not None and ids[-1] == eos)
