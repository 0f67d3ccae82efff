"""Hugging Face model folders: config.json, generation_config.json, safetensors shards + index.

Written so that both transformers.AutoModelForCausalLM and mlx_lm.load read the same model.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from pissa.errors import PissaError
from pissa.formats.safetensors import StreamWriter
from pissa.layouts import Layout

DEFAULT_SHARD_BYTES = 2 * 1024**3


def model_config(config: Mapping, dtype: str) -> dict:
    """config.json for a model stored in `dtype`, readable alike by transformers and mlx-lm.

    transformers 5 keeps the rope base only in rope_parameters; mlx-lm 0.32 reads only a
    top-level rope_theta and otherwise silently uses 10000 (logits then differ by ~13%).
    So the rope base is written in both places. The weights written are unquantised, so an
    input model's quantisation keys are dropped (QPiSSA adds its own afterwards).
    """
    cfg = {k: v for k, v in config.items()
           if k not in ("quantization", "quantization_config", "pissa_quantization")}
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    elif "rope_theta" in cfg and cfg.get("model_type") == "llama":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"], **(rope or {})}
    if cfg.get("model_type") == "gpt2" and "n_positions" in cfg:
        cfg.setdefault("n_ctx", cfg["n_positions"])  # mlx-lm requires it; transformers 5 no longer writes it
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype  # transformers < 5 reads this name
    return cfg


class ModelWriter:
    """Streams a model's tensors into safetensors shards of at most max_shard_bytes each.

    Args:
        folder: an existing folder.
        plan: (name, numpy dtype, shape) of every tensor, in the order write() receives them.
        max_shard_bytes: shard size limit (a tensor larger than it gets a shard of its own).
        layout: how to store them (pissa.layouts): plan, write() and the files' names and shapes
            differ only for GPT-2-family models, whose Conv1D weights are stored [in, out].
    """

    def __init__(self, folder: Path, plan: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, layout: Layout = Layout()):
        self.folder = Path(folder)
        self.layout = layout
        plan = [(layout.stored_name(n), d, layout.shape(n, s)) for n, d, s in plan]
        shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in plan:
            nbytes = int(np.prod(item[2], dtype=np.int64)) * np.dtype(item[1]).itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self._files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, d, s in plan)
        self._index = 0
        self._left = len(shards[0])
        self._writer = StreamWriter(self.folder / self._files[0], shards[0], {"format": "pt"})

    def write(self, name: str, array: np.ndarray) -> None:
        name, array = self.layout.stored_name(name), self.layout.store(name, array)
        if self._left == 0:
            self._writer.close()
            self._index += 1
            self._left = len(self._shards[self._index])
            self._writer = StreamWriter(self.folder / self._files[self._index],
                                        self._shards[self._index], {"format": "pt"})
        self._writer.write(name, array)
        self._left -= 1

    def close(self) -> None:
        self._writer.close()
        if self._index != len(self._shards) - 1:
            raise RuntimeError("ModelWriter closed before every shard was written")
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self._total},
                     "weight_map": {name: f for f, shard in zip(self._files, self._shards) for name, _, _ in shard}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless force, before any work starts.

    Raises:
        PissaError: naming the folder and --force.
    """
    if out.exists() and not out.is_dir():
        raise PissaError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PissaError(f"--out {out} is not empty; choose another folder or pass --force to replace it")


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out` in one rename.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out).absolute()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
