"""Packed rows for mlx-lm models: the final hidden states of a batch whose rows hold several examples
(pissa.training.batches), attention kept inside each example, and the output head apart from them
(pissa_mlx.loss sends only the labelled rows through it).

mlx-lm's models build their causal mask inside the inner model's __call__ and take no mask from
outside, but they ask a layer's KV cache for it (models/base.py create_attention_mask calls
cache.make_mask), and hand that cache to attention. SegmentCache is such a cache that stores
nothing: offset 0, keys and values passed through, and the batch's record layout. Attention then
runs within each record, never over a row's [t, t] square: the model module's
scaled_dot_product_attention (mlx-lm's, which each module imports from models/base.py) is wrapped
once so that a layer given a SegmentCache gathers the records into batches of similar lengths
(pissa.numeric.records) and calls mx.fast.scaled_dot_product_attention on them with its own causal
mask; every other call reaches mlx-lm's function as it was. A boolean [b, 1, t, t] mask would make
MLX fall back from its fused kernel to [b, H, t, t] scores (measured: 1.8x the memory of the same
tokens in short rows). Gemma 2, whose layers compute attention themselves (a logit softcap), keeps
the block-diagonal boolean mask. Each model runs its own embedding scale, layer kinds and norms.
Positions do not restart under it, which RoPE does not need:
attention scores depend only on i - j, which stays inside one example (only the rounding of the
angles changes). GPT-2's absolute positions do need restarts, so GPT-2's inner model is driven
here, with its position embeddings looked up at the batch's position ids.

The architectures are pissa.files.packable's, one list for both backends: each is checked in
tests/backend_mlx/test_packing.py (packed losses and gradients equal to unpacked ones; the head here
gives the model's own logits).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from pissa.errors import PissaError
from pissa.files.packable import PACKABLE

def model_type(model: nn.Module) -> str:
    """The mlx-lm module a model was loaded as (mlx_lm.utils' MODEL_REMAPPING: Mistral is llama)."""
    from mlx_lm.utils import MODEL_REMAPPING

    kind = getattr(model, "model_type", None) or ""
    return MODEL_REMAPPING.get(kind, kind)


def packs(model: nn.Module) -> bool:
    """Whether packed rows of this model run exactly here (pissa.files.packable's architectures)."""
    return model_type(model) in PACKABLE and hasattr(model, "model")


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


@dataclass(frozen=True)
class Window:
    """What SegmentCache.make_mask gives a layer whose attention runs on the records (no mask array):
    its sliding window, counted inside each record, or None for the whole record."""

    size: int | None


class SegmentCache:
    """A KV cache that caches nothing and tells the layers where the records of a packed batch are
    (see the module docstring). With `records` (the batch's record buckets and their inverse, from
    pissa.numeric.records) make_mask answers a Window and attention runs on the records themselves
    (records_attention); without them, or where a model asks for a mask array (Gemma 2's own
    attention), the block-diagonal boolean mask of `segments` [b, t]. `heads_axis` adds the axis
    Gemma 2's attention needs when it groups query heads by KV head ([b, kv, repeats, t, t] scores)."""

    offset = 0

    def __init__(self, segments: mx.array, heads_axis: bool = False, records=None):
        self.segments, self.heads_axis, self.records = segments, heads_axis, records

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_):
        if n != self.segments.shape[1]:
            raise ValueError(f"a mask of {n} positions asked for segments of {self.segments.shape[1]}")
        if self.records is not None and not (return_array or self.heads_axis):
            return Window(window_size)
        mask = segment_mask(self.segments, window_size)
        return mask[:, :, None] if self.heads_axis else mask


def records_attention(queries: mx.array, keys: mx.array, values: mx.array, records, scale: float,
                      window: int | None) -> mx.array:
    """Causal attention inside each record: queries [b, H, t, d], keys and values [b, KV, t, d] ->
    [b, H, t, d]. records: (buckets, inverse), each bucket [n, L] flat indices into b * t (a batch
    of records, pissa.numeric.records), inverse [b * t] each token's slot in the buckets' outputs.
    mx.fast.scaled_dot_product_attention takes GQA as it is and a causal mask as its own
    ("causal"); a sliding window is an [L, L] mask of the bucket, never of the row."""
    buckets, inverse = records
    b, heads, t, d = queries.shape

    def gather(x: mx.array, index: mx.array) -> mx.array:
        n, length = index.shape
        flat = x.transpose(0, 2, 1, 3).reshape(b * t, x.shape[1], d)
        return flat[index.reshape(-1)].reshape(n, length, x.shape[1], d).transpose(0, 2, 1, 3)

    outs = []
    for index in buckets:
        n, length = index.shape
        mask = "causal"
        if window is not None and window < length:
            i = mx.arange(length)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        out = mx.fast.scaled_dot_product_attention(gather(queries, index), gather(keys, index), gather(values, index),
                                                   scale=scale, mask=mask)
        outs.append(out.transpose(0, 2, 1, 3).reshape(n * length, heads, d))
    return mx.concatenate(outs)[inverse].reshape(b, t, heads, d).transpose(0, 2, 1, 3)


def _with_records(original):
    """mlx-lm's scaled_dot_product_attention, or records_attention for a layer given a SegmentCache
    with records (every other call goes to mlx-lm's as it is)."""
    def attention(queries, keys, values, cache=None, scale=1.0, mask=None, **kwargs):
        if isinstance(cache, SegmentCache) and isinstance(mask, Window):
            return records_attention(queries, keys, values, cache.records, scale, mask.size)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)

    attention.pissa_records = True
    return attention


def _route_attention(model: nn.Module) -> bool:
    """Make the model's mlx-lm module call attention through _with_records (once). False for a
    model whose layers compute attention themselves (Gemma 2: its logit softcap), which keep the
    boolean mask."""
    module = sys.modules[type(model.model).__module__]
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is None:
        return False
    if not getattr(current, "pissa_records", False):
        module.scaled_dot_product_attention = _with_records(current)
    return True


def _check(model: nn.Module) -> str:
    if not packs(model):
        raise PissaError(f"the mlx backend cannot pack examples for a {model_type(model)} model "
                         "(pissa.files.packable); train it with --no-packing")
    return model_type(model)


def hidden_states(model: nn.Module, inputs: mx.array, segments: mx.array | None = None,
                  positions: mx.array | None = None, records=None) -> mx.array:
    """The final (normed) hidden states [b, t, d] of token ids [b, t]: of each example alone when
    `segments` [b, t] (its example's number in the row, -1 on pads) is given, with `positions`
    [b, t] (restarting at 0 per example) for GPT-2. With `records` (buckets, inverse: see
    records_attention) attention runs on the records themselves, not over the rows' squares.

    Raises:
        PissaError: segments for a model packs() refuses.
    """
    if segments is None:
        return model.model(inputs)
    kind = _check(model)
    if records is not None and not _route_attention(model):
        records = None
    if kind == "gpt2":
        if positions is None:
            raise ValueError("GPT-2's packed rows need their position ids")
        inner = model.model
        h = inner.wte(inputs) + inner.wpe(positions)
        cache = SegmentCache(segments, records=records)
        mask = cache.make_mask(segments.shape[1])
        for layer in inner.h:
            h = layer(h, mask, cache)
        return inner.ln_f(h)
    args = model.args
    heads_axis = kind == "gemma2" and args.num_attention_heads != args.num_key_value_heads
    cache = [SegmentCache(segments, heads_axis, records) for _ in model.layers]
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
