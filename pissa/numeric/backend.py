"""The Backend protocol: the framework primitives the shared driver calls, and nothing more.

pissa_torch.backend and pissa_mlx.backend implement it (a module is the implementation: its
functions are the members). Everything that reads the same on both frameworks is written once in
the core on top of it: putting adapters on a model (pissa.adapters.model), loading a folder
(pissa.files.models), the training set-up and loop (pissa.training), the eval loss, evaluate and
answer (pissa.studies.evaluate), the stable KL (pissa.numeric.kl) and the precision rule below.
The array operations of the decomposition and the KL are the other protocol, Ops (pissa.numeric.ops).

A model here is the framework's own (a transformers nn.Module, an mlx-lm nn.Module); a base module
is one of its linear layers (nn.Linear, a quantised linear, transformers' Conv1D); a layer is the
backend's class for an adapter kind (pissa_<name>.layers.<kind>.LAYER), which wraps a base module.
Module paths are PEFT's ("model.layers.0.self_attn.q_proj") whatever the framework calls them.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from pissa.errors import PissaError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class Layer(Protocol):
    """An adapter layer: a base module plus a kind's trainable parameters."""

    merged: bool

    @classmethod
    def from_params(cls, base: Any, params: tuple, spec) -> "Layer":
        """Wrap `base` with the kind's parameters (the backend's arrays, in the kind's TENSORS
        order; empty for full fine-tuning's init). Raises ValueError when they do not fit."""

    def params(self) -> tuple:
        """The trainable parameters, in the kind's TENSORS order."""

    @property
    def quantized(self) -> bool:
        """Whether the base is a quantised layer (QPiSSA)."""

    def merge(self) -> None:
        """Fold the update into the base weight (PissaError on a quantised base)."""

    def unmerge(self) -> None:
        ...


class Backend(Protocol):
    name: str                     # "torch" or "mlx"
    launcher: str                 # the launcher whose ranks this backend joins: "torchrun", "mlx.launch"
    shards: bool                  # whether --shard (FSDP2) exists here
    qpissa_scheme: str            # the quantisation QPiSSA uses here by default ("nf4", "affine4"): pissa compare, messages

    # ---------------------------------------------------------------- arrays and devices
    def to_numpy(self, x: Any) -> np.ndarray:
        """A host copy (bfloat16 as ml_dtypes.bfloat16)."""

    def detach(self, x: Any) -> Any:
        """x without its autograd history (the array itself where there is none)."""

    def from_numpy(self, a: np.ndarray, like: Any = None) -> Any:
        """The backend's copy of `a`, in a's dtype, or in the parameter dtype of the base module
        `like` (the float dtype an adapter on it computes in) and on its device."""

    def device(self, name: Any = None, local_rank: int = 0) -> Any:
        """The device to run on: a name ("cpu", "cuda", "gpu"), None (the framework's default;
        under a launcher, rank `local_rank`'s accelerator), or a device this returned before
        (returned as it is). Raises PissaError for a device this machine lacks."""

    def accelerator(self, device: Any) -> tuple[bool, bool]:
        """(is it an accelerator rather than the CPU, does it compute in bfloat16)."""

    # ---------------------------------------------------------------- models and layers
    def load_base(self, model_dir: Any, device: Any, precision: str) -> Any:
        """The folder's model without an adapter (quantised residuals as quantised layers), on
        `device`, its floating-point weights in the precision's dtype. Raises PissaError."""

    def targets(self, model: Any, spec) -> dict[str, Any]:
        """PEFT module path -> base module, for the linear layers spec.matches (never the output
        embeddings under all-linear). Raises PissaError when nothing matches."""

    def weight_shape(self, base: Any) -> tuple[int, int]:
        """[out, in] of a base module."""

    def is_quantized(self, base: Any) -> bool:
        ...

    def read_weight(self, base: Any) -> np.ndarray:
        """The base's weight as float32 numpy [out, in] (dequantised, or a Conv1D's transposed)."""

    def write_weight(self, base: Any, weight: np.ndarray) -> None:
        """Replace the base's weight with `weight` [out, in] (the residual), in its own dtype."""

    def layer(self, kind: str) -> type:
        """The backend's Layer class of an adapter kind."""

    def adapter_layers(self, model: Any) -> Iterator[tuple[str, Layer]]:
        """(PEFT module path, layer) of every adapter layer of the model."""

    def replace(self, model: Any, layers: Sequence[tuple[str, Layer]]) -> None:
        """Put each layer where its base module was."""

    def freeze(self, model: Any) -> None:
        """Freeze every parameter but the adapter layers' params()."""

    # ---------------------------------------------------------------- forward passes
    def unpackable(self, model_dir: Any) -> str | None:
        """Why this backend cannot pack examples exactly for the model of this folder (its attention
        would cross from one example to the next, or its positions would not restart), or None
        when it can: a batch with position_ids and segment_ids (pissa.training.batches) then gives
        each example exactly the loss it has alone."""

    def loss_sum(self, model: Any, batch: dict[str, np.ndarray], precision: str) -> tuple[float, int]:
        """No gradient: the summed cross-entropy of a collated batch's labelled next tokens
        (pissa.training.batches.collate_rows: packed when it has segment_ids), and their count."""

    def logits(self, model: Any, batch: dict[str, np.ndarray], precision: str) -> Any:
        """No gradient: float32 logits [b, t - 1, vocab] of a collated batch (position t predicts
        token t + 1), as the backend's array (the KL runs on it with the backend's Ops)."""

    def generate(self, model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                 stops: set[int]) -> list[str]:
        """Greedy completions of already-formatted prompts, decoded as one left-padded batch;
        each answer is the one its prompt gets alone."""

    # ---------------------------------------------------------------- training
    def trainer(self, run: Any, model: Any, device: Any, precision: str, shard: bool) -> Any:
        """The framework half of a run (pissa.training.loop.Steps) around `model`, which
        carries run.start's adapter: optimizer (resumed from run.checkpoint), compiled steps,
        distributed wrapping over run.group."""


def get_backend(name: str) -> ModuleType:
    """The Backend of a framework by name, "torch" or "mlx".

    Raises:
        PissaError: for another name, or a backend whose framework is not installed.
    """
    if name not in ("torch", "mlx"):
        raise PissaError(f"unknown backend {name!r} for this command; choose torch or mlx")
    try:
        return importlib.import_module(f"pissa_{name}.backend")
    except ImportError as e:
        raise PissaError(f"the {name} backend is not available ({e}); install it with: pip install 'pissa[{name}]'") from None


def resolve_precision(precision: str, accelerator: bool, bf16: bool) -> str:
    """The precision a run computes in: "auto" is bf16 on an accelerator that has it, fp32 on
    the CPU (where bf16 matmuls are slower than fp32: torch's autocast, and MLX, which has no
    BLAS for bf16 there). An explicit choice is kept.

    Raises:
        PissaError: for an unknown name.
    """
    if precision not in PRECISIONS:
        raise PissaError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        return "bf16" if accelerator and bf16 else "fp32"
    return precision
