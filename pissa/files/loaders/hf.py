"""Hugging Face model folders: config.json plus safetensors weights, one file or sharded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pissa.files import layouts
from pissa.errors import PissaError
from pissa.files.formats import quantized
from pissa.files.formats.safetensors import SafetensorsFile, is_float

INDEX = "model.safetensors.index.json"
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors dtype -> storage dtype
# A quantised input's weights are dequantised on read; pissa init stores them in this dtype by
# default: the dtype the quantisation libraries compute in, half float32's size.
DEQUANTIZED_DTYPE = "bfloat16"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PissaError(f"{path} is not readable JSON ({e}); re-download or re-export it") from None
    if not isinstance(data, dict):
        raise PissaError(f"{path} holds a JSON {type(data).__name__}, not an object; re-download or re-export it")
    return data


def with_top_level_rope_theta(config: dict) -> dict:
    """config, with rope_theta also at the top level when only rope_parameters has it.

    transformers 5 writes the rope base only inside rope_parameters; mlx-lm 0.32 reads only the
    top-level key and otherwise silently uses 10000, which changes the model's logits.
    """
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config = {**config, "rope_theta": rope["rope_theta"]}
    return config


class HFSource:
    """A Hugging Face model folder, read through memory maps one tensor at a time.

    Args:
        path: the folder, holding config.json and either model.safetensors.index.json with its
            shards, or a single .safetensors file (model.safetensors preferred).

    Raises:
        PissaError: when config.json or the weights are missing, the index names a shard that is
            not there or a tensor its shard lacks, or a file is truncated or corrupt.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise PissaError(f"{self.path} has no config.json; pass a Hugging Face model folder "
                             "(config.json and .safetensors weights)")
        self.config = with_top_level_rope_theta(_read_json(self.path / "config.json"))
        gen = self.path / "generation_config.json"
        self.generation_config = _read_json(gen) if gen.is_file() else None
        self._where: dict[str, SafetensorsFile] = {}
        if (self.path / INDEX).is_file():
            self._open_sharded()
        else:
            self._open_single()
        # A quantised folder (MLX affine, bitsandbytes) is seen through its dequantised weights.
        raw = {n: f.shape(n) for n, f in self._where.items()}
        stored = {n: _STORED.get(f.dtype(n), "float32") for n, f in self._where.items()}
        shapes, self._read = quantized.unquantized_view(self.config, raw, self._raw_get, str(self.path), stored)
        # GPT-2's Conv1D weights are stored [in, out], and its Hub files lack the module paths'
        # prefix: pissa sees module paths and [out, in] (pissa.files.layouts).
        self.layout = layouts.of(self.config, list(shapes), str(self.path), quantized.describe(self.config))
        self._shapes = {self.layout.name(n): self.layout.shape(self.layout.name(n), s) for n, s in shapes.items()}

    def _open_sharded(self) -> None:
        index = self.path / INDEX
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PissaError(f"{index} has no weight_map; re-download or re-export the model")
        missing = sorted({s for s in weight_map.values() if not (self.path / s).is_file()})
        if missing:
            raise PissaError(f"{index} lists shards that are not in the folder: {', '.join(missing)}; "
                             "download the missing shards")
        files = {s: SafetensorsFile(self.path / s) for s in dict.fromkeys(weight_map.values())}
        keys = {s: set(f.keys()) for s, f in files.items()}
        absent = [f"{n} (in {s})" for n, s in weight_map.items() if n not in keys[s]]
        if absent:
            raise PissaError(f"{index} names {len(absent)} tensors that its shards lack, e.g. {absent[0]}; "
                             "re-download the model")
        self._where = {n: files[s] for n, s in weight_map.items()}

    def _open_single(self) -> None:
        candidates = sorted(self.path.glob("*.safetensors"))
        main = self.path / "model.safetensors"
        if main.is_file():
            candidates = [main]
        if not candidates:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (f"it has PyTorch weights ({bins[0]}); re-save them as safetensors with "
                    "transformers' save_pretrained" if bins else "download the model's .safetensors weights")
            raise PissaError(f"{self.path} has no .safetensors weights; {hint}")
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise PissaError(f"{self.path} has several .safetensors files ({names}) but no {INDEX}; "
                             f"add the index or keep only the model's weights file")
        f = SafetensorsFile(candidates[0])
        self._where = {n: f for n in f.keys()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def storage_dtype(self) -> str:
        if quantized.describe(self.config):
            return DEQUANTIZED_DTYPE
        sizes: dict[str, int] = {}
        for name, f in self._where.items():
            if f.dtype(name) in _STORED:
                sizes[_STORED[f.dtype(name)]] = sizes.get(_STORED[f.dtype(name)], 0) + int(np.prod(f.shape(name)))
        return max(sizes, key=sizes.get) if sizes else "float32"

    def get(self, name: str) -> np.ndarray:
        return self.layout.load(name, self._read(self.layout.stored_name(name)))

    def release(self) -> None:
        for f in set(self._where.values()):
            f.release()

    def stored(self, name: str) -> np.ndarray:
        stored_name = self.layout.stored_name(name)
        raw = self._where[stored_name].get(stored_name) if stored_name in self._where else None
        if raw is None or not is_float(raw.dtype):  # a quantised weight: its codes are not the tensor
            return self.get(name)
        return self.layout.load(name, raw)

    def _raw_get(self, name: str) -> np.ndarray:
        a = self._where[name].get(name)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
            return np.array(a, dtype=np.float32)  # a writable copy, not a view of the file
        return np.array(a)

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        """Copy the folder's tokenizer files (those of TOKENIZER_FILES that exist) into out_dir.

        Returns their names; an empty list when the folder has none.
        """
        out_dir = Path(out_dir)
        names = [n for n in TOKENIZER_FILES if (self.path / n).is_file()]
        if names:
            out_dir.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(self.path / n, out_dir / n)
        return names
