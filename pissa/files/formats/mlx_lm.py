"""mlx-lm adapter folders: adapter_config.json + adapters.safetensors (numpy only, no mlx import).

What mlx-lm 0.32 reads (mlx_lm/tuner/utils.py load_adapters and linear_to_lora_layers,
mlx_lm/tuner/lora.py LoRALinear):
- adapter_config.json: fine_tune_type "lora", num_layers, and lora_parameters {rank, scale,
  dropout, keys}. The last num_layers transformer blocks (model.layers[-num_layers:]; -1 means
  all) get a LoRALinear at every module path in `keys`, relative to a block ("self_attn.q_proj");
  a key can also be a full path outside the blocks ("lm_head").
- adapters.safetensors: "<module path>.lora_a" [in, r] and "<module path>.lora_b" [r, out],
  the transposes of PEFT's lora_A [r, in] and lora_B [out, r]; LoRALinear computes
  y = x W^T + scale * (x @ lora_a) @ lora_b, so `scale` is PEFT's alpha / r (or alpha / sqrt(r)).

DoRA (mlx_lm/tuner/dora.py DoRALinear): fine_tune_type "dora", and beside lora_a / lora_b the
magnitude "<module path>.m" [out]. A kind says its mlx-lm form in MLX_LM (fine_tune_type, our tensor
name -> mlx-lm's leaf name), or None when mlx-lm has no layer for it. Matrices are stored transposed
(x @ lora_a), vectors as they are.

We always write num_layers -1: a block whose module carries no weights in the file keeps the
LoRALinear's lora_b at zeros, so it adds exactly nothing, and an adapter on some blocks only
(e.g. a regex over layer indices) still lands on the right ones.

PEFT and mlx-lm both name their config adapter_config.json, and PEFT warns (wrongly advising an
upgrade) about mlx-lm's fields in it. So an adapter folder that holds both forms (`pissa convert
--format mlx-lm`, a DoRA run's RUN_DIR/adapter) keeps mlx-lm's files in a folder of their own,
DIR/mlx_lm (FOLDER): `mlx_lm.load(BASE, adapter_path=DIR/mlx_lm)`. Folders written before that,
with both sets of fields in one config, still read: pissa.files.formats.peft skips mlx-lm's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pissa.errors import PissaError
from pissa.files.formats import safetensors
from pissa.adapters.adapter import Adapter
from pissa.files.layouts import mlx_lm_path
from pissa.adapters.spec import AdapterSpec, dumps

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
FOLDER = "mlx_lm"  # mlx-lm's files inside an adapter folder that also holds PEFT's
_BLOCK = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.(.+)$")  # model.layers (Llama), model.h (GPT-2)


def _key(module: str) -> str:
    """The module path relative to its transformer block, or the full path outside the blocks."""
    m = _BLOCK.match(module)
    return m.group(2) if m else module


def form(kind) -> tuple[str, dict[str, str]] | None:
    """(fine_tune_type, {our tensor name: mlx-lm's}) of an adapter kind (pissa.adapters.kinds), or
    None when mlx-lm has no layer for it."""
    return kind.MLX_LM


def save_mlx_adapter(folder: str | Path, adapter: Adapter) -> None:
    """Write `adapter` as mlx-lm files into `folder` (created if missing): a plain LoRA (e.g. the
    rank-2r result of pissa convert) for `mlx_lm.load(BASE, adapter_path=folder)` or
    `mlx_lm.generate --model BASE --adapter-path folder` on the ORIGINAL base model; a kind with
    its own mlx-lm form (DoRA) for the model it was trained on (the pissa init folder).

    Module paths are turned into mlx-lm's: the same for Llama-family models; for GPT-2, whose
    adapters record model_type, "transformer.h.N" becomes mlx-lm's "model.h.N" (pissa.files.layouts).
    Beside a PEFT adapter, `folder` is that adapter's FOLDER subfolder.

    Raises:
        PissaError: when the adapter is empty, or of a kind mlx-lm has no layer for.
    """
    folder = Path(folder)
    if not adapter.factors:
        raise PissaError("the adapter has no modules; nothing to export for mlx-lm")
    kind = adapter.spec.kind_module
    if form(kind) is None:
        raise PissaError(f"mlx-lm has no layer for a {kind.NAME} adapter; merge it into the model instead: "
                         "pissa merge MODEL_DIR --adapter ADAPTER --out MERGED")
    fine_tune_type, names = form(kind)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    model_type = adapter.info.get("model_type")
    spec = adapter.spec
    # mlx-lm has one rank and one scale: per-module ranks (a rank_pattern) are padded with zeros to
    # the largest, and a module's own scale is folded into its B.
    rank = max(spec.for_module(m).rank for m in adapter.factors)
    for path, params in adapter.factors.items():
        module = mlx_lm_path(model_type, path)
        A, B, *rest = params
        own = spec.for_module(path)
        if own.scale != spec.scale:
            B = (B.astype(np.float64) * (own.scale / spec.scale)).astype(B.dtype)
        A = np.concatenate([A, np.zeros((rank - A.shape[0], A.shape[1]), A.dtype)]) if A.shape[0] < rank else A
        B = np.concatenate([B, np.zeros((B.shape[0], rank - B.shape[1]), B.dtype)], axis=1) if B.shape[1] < rank else B
        for name, p in zip(kind.TENSORS, (A, B, *rest)):
            # PEFT A [r, in] -> lora_a [in, r], B [out, r] -> lora_b [r, out]; DoRA's m [out] as it is
            tensors[f"{module}.{names[name]}"] = np.ascontiguousarray(p.T if p.ndim == 2 else p)
    safetensors.save(folder / WEIGHTS, tensors, metadata={"format": "mlx"})
    cfg: dict = {
        "fine_tune_type": fine_tune_type,
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": spec.scale,
            "dropout": 0.0,
            "keys": sorted({_key(m) for m in adapter.factors}),
        },
    }
    (folder / CONFIG).write_text(dumps(cfg))


def load_mlx_adapter(folder: str | Path) -> Adapter:
    """Read an mlx-lm LoRA folder back into pissa's orientation (A [r, in], B [out, r]).

    The spec gets rank, alpha = scale * rank and the module names as targets.

    Raises:
        PissaError: a missing file, a fine_tune_type other than "lora", or a module with only
            one of lora_a / lora_b.
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise PissaError(f"{folder} is not an mlx-lm adapter folder (needs {CONFIG} and {WEIGHTS})")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise PissaError(f"{folder}: fine_tune_type {cfg.get('fine_tune_type')!r}; pissa reads LoRA adapters only")
    params = cfg["lora_parameters"]
    f = safetensors.SafetensorsFile(folder / WEIGHTS)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name in f.keys():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            parts.setdefault(module, {})[leaf] = np.array(f.get(name))
    broken = [m for m, d in parts.items() if len(d) != 2]
    if broken:
        raise PissaError(f"{folder}: modules with only one of lora_a / lora_b: {', '.join(sorted(broken))}")
    factors = {m: (np.ascontiguousarray(d["lora_a"].T), np.ascontiguousarray(d["lora_b"].T))
               for m, d in parts.items()}
    rank = int(params["rank"])
    spec = AdapterSpec(rank=rank, alpha=float(params["scale"]) * rank, targets=tuple(sorted(factors)), init="lora")
    return Adapter(spec, factors, base_model=cfg.get("base_model_name_or_path"), info={"role": "lora"})
