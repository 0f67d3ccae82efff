"""Checkpoint layouts: how a model's files name and orient its tensors, against pissa's convention.

Inside pissa a tensor is named by its transformers module path (what PEFT's adapter keys hold after
"base_model.model.") and a linear weight is [out, in]. Llama-family checkpoints already follow it.
GPT-2-family checkpoints differ in two ways, converted here, by name, where files are read and
written (pissa.files.loaders.hf, pissa.files.formats.hf.ModelWriter), and nowhere else:

- Their linear layers are transformers' Conv1D, which stores its weight [in, out] and computes
  x @ W + b. PEFT adapts it with fan_in_fan_out: lora_A stays [r, in] and lora_B [out, r], and only
  the base weight is transposed where it is used (peft/tuners/lora/layer.py: pissa_init and
  get_delta_weight). pissa does the same: the transpose happens at the file edge.
- The Hub's checkpoints (openai-community/gpt2 and its fine-tunes) name tensors without the
  "transformer." prefix of the module paths ("h.0.attn.c_attn.weight"); save_pretrained writes it.
  transformers reads both. mlx-lm reads only the unprefixed names: its gpt2 sanitize() transposes
  exactly those Conv1D weights and puts the model under "model." ("model.h.0.attn.c_attn").
So a GPT-2 residual model is written in the Hub's layout (no prefix, Conv1D weights [in, out]),
which transformers and mlx-lm both load, and adapters use the module paths PEFT needs.

transformers' other Conv1D models (ImageGPT, Decision Transformer, CLVP) are not causal language
models pissa trains; their checkpoints are refused rather than read in the wrong orientation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pissa.errors import PissaError

# model_type -> (the module-path prefix of the Hub's unprefixed names, Conv1D module suffixes),
# read from transformers' modeling_gpt2.py and modeling_openai.py.
CONV1D_MODELS = {
    "gpt2": ("transformer.", ("attn.c_attn", "attn.q_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "openai-gpt": ("transformer.", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
}
REFUSED_CONV1D = ("imagegpt", "decision_transformer", "clvp")
# mlx-lm's module paths where they differ from transformers': model_type -> (ours, mlx-lm's) prefix.
MLX_LM_PREFIX = {"gpt2": ("transformer.", "model.")}


@dataclass(frozen=True)
class Layout:
    """How one set of files stores a model. The identity layout (the default) is pissa's own.

    prefix: the module-path prefix that the stored names lack ("" when they have it).
    conv1d: module-name suffixes whose ".weight" is stored [in, out].
    """

    model_type: str | None = None
    prefix: str = ""
    conv1d: tuple[str, ...] = field(default_factory=tuple)

    @property
    def identity(self) -> bool:
        return not self.prefix and not self.conv1d

    def name(self, stored: str) -> str:
        """The module-path name of a stored tensor name (the output layer sits outside the prefix)."""
        return stored if not self.prefix or stored.startswith("lm_head.") else self.prefix + stored

    def stored_name(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def transposed(self, name: str) -> bool:
        """Whether the tensor `name` (module path + ".weight") is stored [in, out]."""
        return bool(self.conv1d) and name.endswith(".weight") and name[: -len(".weight")].endswith(self.conv1d)

    def shape(self, name: str, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Our shape of a tensor from its stored shape (and back: the transpose is its own inverse)."""
        return tuple(reversed(stored_shape)) if self.transposed(name) and len(stored_shape) == 2 else tuple(stored_shape)

    def load(self, name: str, array: np.ndarray) -> np.ndarray:
        """A stored tensor in our orientation ([out, in] for a Conv1D weight)."""
        return np.ascontiguousarray(array.T) if self.transposed(name) and array.ndim == 2 else array

    store = load  # and back to the stored orientation

    def for_writing(self) -> "Layout":
        """The layout a model of this type is written in: the Hub's (see the module docstring)."""
        if self.model_type in CONV1D_MODELS:
            prefix, conv1d = CONV1D_MODELS[self.model_type]
            return Layout(self.model_type, prefix, conv1d)
        return self


def of(config: dict, names: list[str], where: str, quantized: str | None = None) -> Layout:
    """The layout of a checkpoint from its config.json and stored tensor names.

    Args:
        quantized: the checkpoint's quantisation (pissa.files.formats.quantized.describe), or None.

    Raises:
        PissaError: for a model type that stores Conv1D weights and that pissa does not handle, and
            for a GPT-2-family checkpoint in another layout than the Hub's or save_pretrained's
            (quantised, or saved by mlx-lm), whose orientation pissa does not know.
    """
    model_type = config.get("model_type")
    if model_type in REFUSED_CONV1D:
        raise PissaError(f"{where} is a {model_type} model, whose layers are transformers' Conv1D (weights stored "
                         "[in, out]) and which is not a causal language model pissa trains; pissa reads GPT-2 and "
                         "OpenAI GPT among the Conv1D models")
    if model_type not in CONV1D_MODELS:
        return Layout()
    prefix, conv1d = CONV1D_MODELS[model_type]
    if quantized or any(n.startswith("model.") for n in names):
        what = f"quantised ({quantized})" if quantized else "saved by mlx-lm"
        raise PissaError(f"{where} is a {model_type} checkpoint {what}; pissa reads {model_type} checkpoints "
                         "unquantised, as the Hub or transformers' save_pretrained store them")
    has_prefix = any(n.startswith(prefix) for n in names)
    return Layout(model_type, "" if has_prefix else prefix, conv1d)


def base_model_info(layout: Layout, modules: list[str]) -> dict:
    """What an init's adapter records about its model's layout: fan_in_fan_out (PEFT's name for
    a base weight stored [in, out]) when its targets are Conv1D layers, and the model type whose
    module paths mlx-lm names otherwise (pissa.files.formats.mlx_lm). Empty for Llama-family models."""
    info: dict = {}
    if any(layout.transposed(m + ".weight") for m in modules):
        info["fan_in_fan_out"] = True
    if layout.model_type in MLX_LM_PREFIX:
        info["model_type"] = layout.model_type
    return info


def mlx_lm_path(model_type: str | None, path: str) -> str:
    """mlx-lm's module path for one of ours ("transformer.h.0.attn.c_attn" -> "model.h.0.attn.c_attn")."""
    ours, theirs = MLX_LM_PREFIX.get(model_type, ("", ""))
    return theirs + path[len(ours):] if ours and path.startswith(ours) else path


def from_mlx_lm_path(model_type: str | None, path: str) -> str:
    """Our module path (PEFT's) for one of mlx-lm's; the inverse of mlx_lm_path."""
    ours, theirs = MLX_LM_PREFIX.get(model_type, ("", ""))
    return ours + path[len(theirs):] if theirs and path.startswith(theirs) else path
