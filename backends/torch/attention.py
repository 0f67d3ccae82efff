"""Attention within each record of a packed batch, for transformers models: never a row's [L, L] mask.

transformers packs from position_ids by building a boolean block-diagonal [b, 1, L, L] mask; SDPA
then leaves its flash kernel, transformers turns GQA off and copies K and V (repeat_kv), and every
tile of each row is computed: at 8k-token rows of 500-token records about 30x the work the records
need. Here the attention function is registered with transformers' AttentionInterface, under
"pissa+sdpa" / "pissa+eager" (the model's own implementation after the "+"), and runs:
- for a batch with its records (the `records` keyword argument, a RecordLayout moved to the
  device, which transformers hands every attention layer): attention over the records themselves
  (a packed row's records, or an unpacked batch's rows, each one record without its pads):
  flash-attn's varlen kernel on CUDA where flash-attn is installed; else SDPA over the records
  gathered into power-of-two buckets [n, L] (pissa.numeric.records), causal and nothing else, with
  GQA left to the kernel (enable_gqa); a sliding window or Gemma 2's logit softcap takes an [L, L]
  mask or scores of its bucket, never of the row;
- for anything else (unpacked rows, evals with padding masks, generation with a cache), the
  model's own implementation, with the mask transformers builds for it (the mask interface maps
  "pissa+<impl>" to <impl>'s mask), so nothing changes there.
Such a forward passes a 4-D placeholder attention_mask, which transformers returns as it is
(masking_utils: a 4-D mask is "already prepared"): no mask is built, and neither transformers'
check of position_ids for packed sequences nor its check of a padding mask for a skippable causal
mask, each a host sync, runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from pissa.numeric.records import RecordLayout, record_layout

BASES = ("sdpa", "eager")  # the implementations a packed model may start from; "pissa+<base>" wraps each
PREFIX = "pissa+"


@dataclass
class DeviceLayout:
    """A RecordLayout's index tensors on the device (moved once per micro-batch, before the step),
    and each token's position in its record [b, t] (the position ids the model's embeddings take)."""

    buckets: tuple[torch.Tensor, ...]
    inverse: torch.Tensor
    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    positions: torch.Tensor

    @classmethod
    def of(cls, segments: np.ndarray, positions: np.ndarray, device: torch.device) -> "DeviceLayout":
        layout: RecordLayout = record_layout(segments)

        def move(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

        return cls(tuple(move(g) for g in layout.buckets), move(layout.inverse), move(layout.tokens),
                   move(layout.cu_seqlens), layout.max_length, move(positions))


def flash_varlen(query: torch.Tensor):
    """flash-attn's varlen kernel for this query, or None: it runs on CUDA in half precision, where
    flash-attn is installed."""
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [L, L]: key j is seen from query i when j <= i and i - j < window (transformers'
    sliding_window_overlay), counted inside a record."""
    i = torch.arange(length, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def _bucket_attention(q, k, v, scaling, window, softcap, dropout, groups):
    """q [n, H, L, d], k and v [n, KV, L, d]: causal attention inside each of the n records."""
    length = q.shape[2]
    mask = _window_mask(length, window, q.device) if window is not None and window < length else None
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                              scale=scaling, enable_gqa=groups > 1)
    # Gemma 2's softcap: the scores of a bucket, as its eager attention computes those of a row
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(2, 3)) * scaling / softcap) * softcap
    keep = mask if mask is not None else _window_mask(length, length, q.device)
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    weights = F.dropout(weights, p=dropout)  # as eager attention: the softmax in float32 at least
    return weights @ v


@torch.compiler.disable  # its buckets' shapes change with every batch: a compiled layer runs it eagerly
def varlen(module, query, key, value, records: DeviceLayout, scaling=None, dropout=0.0, sliding_window=None,
           softcap=None) -> torch.Tensor:
    """Attention within each record: query [b, H, t, d], key and value [b, KV, t, d] -> [b, t, H, d]."""
    b, heads, t, d = query.shape
    groups = heads // key.shape[1]
    scaling = scaling if scaling is not None else d ** -0.5
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    flash = flash_varlen(query)
    if flash is not None:
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = flash(q[records.tokens], k[records.tokens], v[records.tokens], records.cu_seqlens, records.cu_seqlens,
                    records.max_length, records.max_length, dropout_p=dropout, softmax_scale=scaling, causal=True,
                    window_size=window, softcap=softcap or 0.0)
        full = out.new_zeros((b * t, heads, d)).index_copy_(0, records.tokens, out)
        return full.view(b, t, heads, d)
    outs = []
    for gather in records.buckets:
        n, length = gather.shape
        qb, kb, vb = (x[gather.reshape(-1)].view(n, length, -1, d).transpose(1, 2) for x in (q, k, v))
        ob = _bucket_attention(qb, kb, vb, scaling, sliding_window, softcap, dropout, groups)
        outs.append(ob.transpose(1, 2).reshape(n * length, heads, d))
    return torch.cat(outs)[records.inverse].view(b, t, heads, d)


def _dispatch(base: str):
    def attention(module, query, key, value, attention_mask, records: DeviceLayout | None = None, **kwargs):
        if records is not None:
            kwargs.pop("is_causal", None)
            wanted = {k: kwargs[k] for k in ("scaling", "dropout", "sliding_window", "softcap") if k in kwargs}
            if not module.training:
                wanted["dropout"] = 0.0
            return varlen(module, query, key, value, records, **wanted), None
        if base == "sdpa":
            return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)
        own = sys.modules[type(module).__module__].eager_attention_forward  # each model keeps its own eager
        return own(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"pissa_{base}_attention"
    return attention


for _base in BASES:
    AttentionInterface.register(PREFIX + _base, _dispatch(_base))
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def use_records(model) -> bool:
    """Switch the model's attention to its "pissa+" form (once; a no-op after), so that packed batches
    run attention within each record. False when the model runs another implementation (e.g.
    flash_attention_2 from the user), which packed batches then do not support."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return True
    if current not in BASES:
        return False
    model.config._attn_implementation = PREFIX + current
    return True


def placeholder(device: torch.device) -> torch.Tensor:
    """The 4-D attention_mask of a packed forward: transformers returns a 4-D mask as it is, so none is built."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
