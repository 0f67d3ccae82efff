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
from pissa.files.formats.safetensors import PlacedFile, StreamWriter
from pissa.files.layouts import Layout

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


Plan = Sequence[tuple[str, np.dtype, tuple[int, ...]]]


def stored_plan(plan: Plan, layout: Layout) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """The plan as the files hold it: names and shapes as `layout` stores them (pissa.files.layouts:
    only GPT-2-family Conv1D weights differ, stored [in, out] under the Hub's names)."""
    return [(layout.stored_name(n), d, layout.shape(n, s)) for n, d, s in plan]


def shard_layout(plan: Plan, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[tuple[str, list]]:
    """(file name, its part of the plan) for each shard: tensors in plan order, a new shard when
    the next tensor would pass max_shard_bytes (a tensor larger than it gets a shard of its own)."""
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
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(files, shards))


def write_index(folder: Path, layout: list[tuple[str, list]]) -> None:
    """model.safetensors.index.json, when the model has more than one shard."""
    if len(layout) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, shard in layout for _, d, s in shard)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: f for f, shard in layout for name, _, _ in shard}}
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class ModelWriter:
    """Streams a model's tensors into safetensors shards of at most max_shard_bytes each.

    Args:
        folder: an existing folder.
        plan: (name, numpy dtype, shape) of every tensor, in the order write() receives them.
        max_shard_bytes: shard size limit (a tensor larger than it gets a shard of its own).
        layout: how to store them (pissa.files.layouts): plan, write() and the files' names and shapes
            differ only for GPT-2-family models, whose Conv1D weights are stored [in, out].
    """

    def __init__(self, folder: Path, plan: Plan, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 layout: Layout = Layout()):
        self.folder = Path(folder)
        self.layout = layout
        self._shards = shard_layout(stored_plan(plan, layout), max_shard_bytes)
        self._index = 0
        self._left = len(self._shards[0][1])
        self._writer = StreamWriter(self.folder / self._shards[0][0], self._shards[0][1], {"format": "pt"})

    def write(self, name: str, array: np.ndarray) -> None:
        name, array = self.layout.stored_name(name), self.layout.store(name, array)
        if self._left == 0:
            self._writer.close()
            self._index += 1
            file, shard = self._shards[self._index]
            self._left = len(shard)
            self._writer = StreamWriter(self.folder / file, shard, {"format": "pt"})
        self._writer.write(name, array)
        self._left -= 1

    def close(self) -> None:
        self._writer.close()
        if self._index != len(self._shards) - 1:
            raise RuntimeError("ModelWriter closed before every shard was written")
        write_index(self.folder, self._shards)


class PlacedModelWriter:
    """ModelWriter's files (same shards, same bytes), written in any order and by several
    processes at once: rank 0 calls create() and, once every rank has written its tensors,
    finish(); each rank writes through its own PlacedModelWriter."""

    def __init__(self, folder: Path, layout: list[tuple[str, list]], stored: Layout = Layout()):
        self._files = {file: PlacedFile(Path(folder) / file, shard, {"format": "pt"}) for file, shard in layout}
        self._file_of = {name: self._files[file] for file, shard in layout for name, _, _ in shard}
        self._stored = stored

    @staticmethod
    def create(folder: Path, layout: list[tuple[str, list]]) -> None:
        for file, shard in layout:
            PlacedFile.create(Path(folder) / file, shard, {"format": "pt"})

    def write(self, name: str, array: np.ndarray) -> None:
        name, array = self._stored.stored_name(name), self._stored.store(name, array)
        self._file_of[name].write(name, array)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    @staticmethod
    def finish(folder: Path, layout: list[tuple[str, list]]) -> None:
        write_index(folder, layout)


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


def temp_dir(out: Path, pid: int | None = None) -> Path:
    """The hidden temporary folder next to `out` that the process `pid` (default: this one)
    builds it in."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.tmp-{pid or os.getpid()}"


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder to `out`, replacing an `out` that exists."""
    out = Path(out).absolute()
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out` in one rename.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out).absolute()
    check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
