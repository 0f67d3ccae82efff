"""Packed rows for mlx-lm models: the final hidden states of a batch whose rows hold several examples
(pissa.training.batches), attention kept inside each example, and the output head apart from them
(pissa_mlx.loss sends only the labelled rows through it).

mlx-lm's models build their causal mask inside the inner model's __call__ and take no mask from
outside, but they ask a layer's KV cache for it (models/base.py create_attention_mask calls
cache.make_mask). SegmentCache is such a cache that stores nothing: offset 0, keys and values
passed through, and make_mask gives the block-diagonal causal mask of the batch's segment ids (with
the sliding window a layer asks for). Each model then runs its own embedding scale, layer kinds and
norms; nothing of mlx-lm is patched. Positions do not restart under it, which RoPE does not need:
attention scores depend only on i - j, which the mask keeps inside one example (only the rounding of
the angles changes). GPT-2's absolute positions do need restarts, so GPT-2's inner model is driven
here, with its position embeddings looked up at the batch's position ids.

The architectures are listed by name: each is checked in tests/backend_mlx/test_packing.py (packed
losses and gradients equal to unpacked ones; the head here gives the model's own logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx import nn

from pissa.errors import PissaError

# mlx-lm module (after mlx_lm.utils.MODEL_REMAPPING: Mistral is llama) -> how its inner model runs.
ROPE = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
ABSOLUTE = ("gpt2",)
PACKED = ROPE + ABSOLUTE
# rope scalings whose frequencies depend on the sequence length (mlx_lm.models.rope_utils): a packed
# row is longer than its examples, so they would rotate differently than alone.
LENGTH_DEPENDENT_ROPE = ("dynamic",)


def model_type(config: dict) -> str:
    """The mlx-lm module a config.json loads as (mlx_lm.utils._get_classes' remapping)."""
    from mlx_lm.utils import MODEL_REMAPPING

    kind = config.get("model_type", "")
    return MODEL_REMAPPING.get(kind, kind)


def unpackable_config(config: dict) -> str | None:
    """Why examples of a model with this config.json cannot be packed exactly, or None."""
    kind = model_type(config)
    if kind not in PACKED:
        return f"packing is checked for mlx-lm's {', '.join(PACKED)} models, not {kind or 'this model'}"
    scaling = config.get("rope_scaling") or {}
    rope = scaling.get("type") or scaling.get("rope_type")
    if rope in LENGTH_DEPENDENT_ROPE:
        return f"its {rope} rope scaling depends on the sequence length, which packing changes"
    return None


def unpackable(model_dir) -> str | None:
    """unpackable_config of a model folder's config.json (a reason when there is none)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return f"{model_dir} has no config.json to tell its architecture"
    return unpackable_config(json.loads(path.read_text()))


def segment_mask(segments: mx.array, window: int | None = None) -> mx.array:
    """Boolean [b, 1, t, t]: query i attends to key j when both are in the same segment and
    j <= i (and i - j < window, as mlx_lm.models.base.create_causal_mask). Pads (segment -1)
    attend to earlier pads, so no row of the softmax is empty."""
    t = segments.shape[1]
    i = mx.arange(t)
    keep = (i[:, None] >= i[None]) & (segments[:, :, None] == segments[:, None, :])
    if window is not None:
        keep = keep & (i[:, None] < i[None] + window)
    return keep[:, None]


class SegmentCache:
    """A KV cache that caches nothing and gives the layers the block-diagonal mask of `segments`
    [b, t] (see the module docstring). `heads_axis` adds the axis Gemma 2's attention needs when
    it groups query heads by KV head ([b, kv, repeats, t, t] scores)."""

    offset = 0

    def __init__(self, segments: mx.array, heads_axis: bool = False):
        self.segments, self.heads_axis = segments, heads_axis

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_) -> mx.array:
        if n != self.segments.shape[1]:
            raise ValueError(f"a mask of {n} positions asked for segments of {self.segments.shape[1]}")
        mask = segment_mask(self.segments, window_size)
        return mask[:, :, None] if self.heads_axis else mask


def _check(model: nn.Module) -> str:
    kind = getattr(model, "model_type", None)
    kind = model_type({"model_type": kind})
    if kind not in PACKED or not hasattr(model, "model"):
        raise PissaError(f"the mlx backend cannot pack examples for a {kind} model (pissa_mlx.packing.PACKED); "
                         "train it with --no-packing")
    return kind


def hidden_states(model: nn.Module, inputs: mx.array, segments: mx.array | None = None,
                  positions: mx.array | None = None) -> mx.array:
    """The final (normed) hidden states [b, t, d] of token ids [b, t]: of each example alone when
    `segments` [b, t] (its example's number in the row, -1 on pads) is given, with `positions`
    [b, t] (restarting at 0 per example) for GPT-2.

    Raises:
        PissaError: segments for a model not in PACKED.
    """
    if segments is None:
        return model.model(inputs)
    kind = _check(model)
    if kind == "gpt2":
        if positions is None:
            raise ValueError("GPT-2's packed rows need their position ids")
        inner = model.model
        h = inner.wte(inputs) + inner.wpe(positions)
        mask = segment_mask(segments)
        for layer in inner.h:
            h = layer(h, mask)
        return inner.ln_f(h)
    args = model.args
    heads_axis = kind == "gemma2" and args.num_attention_heads != args.num_key_value_heads
    cache = [SegmentCache(segments, heads_axis) for _ in model.layers]
    return model.model(inputs, cache)


def output_head(model: nn.Module) -> tuple[nn.Module, mx.array | None, float | None]:
    """(module, weight, softcap) of the model's output layer, as its __call__ applies it after
    the inner model: lm_head when the model has one, else the tied input embedding (as_linear).
    weight [vocab, d] is the plain matrix the chunked loss multiplies by (None for any other
    module: quantised, biased, or an adapter layer on lm_head, which the loss calls as it is);
    softcap is Gemma 2's final logit softcapping (logits = cap * tanh(logits / cap)), or None."""
    inner = model.model
    head = getattr(model, "lm_head", None)
    embedding = head is None
    if embedding:
        head = inner.embed_tokens if "embed_tokens" in inner else inner.wte
    weight = None
    if type(head) in (nn.Linear, nn.Embedding) and "bias" not in head:
        weight = head.weight
    return (head.as_linear if embedding else head), weight, getattr(model, "final_logit_softcapping", None)


def head_logits(model: nn.Module, h: mx.array) -> mx.array:
    """The model's logits of hidden states from hidden_states (model(x) == head_logits(model,
    hidden_states(model, x)))."""
    head, _, cap = output_head(model)
    z = head(h)
    return z if cap is None else mx.tanh(z / cap) * cap
