"""Where each record of a packed batch lies, so that attention runs within each record and never
over a row's whole [L, L] square (pissa_torch.attention, pissa_mlx.packing).

A packed batch (pissa.training.batches.collate_rows) holds rows of several records; its
segment_ids [b, t] number each row's records (0, 1, ...; -1 on pads). Attention is causal inside
a record and never crosses one, so it can run on the records themselves: gathered into a batch of
records [n, L] (right-padded), with a causal mask and nothing else, then scattered back to their
rows. Records are bucketed by length (L a power of two, at least MIN_LENGTH; n, the records of a
bucket, a power of two too), so that a long-tailed batch does not pad every record to the longest
and a compiled step sees few shapes: a record of len tokens costs at most (2 len)^2 query-key
pairs, and a bucket's rounding of n at most doubles that, where a row's square costs (sum of
len)^2 (attention_cost measures both).

Everything here runs on the host, from the collated batch, before the step: a device never
answers a question the host could have answered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_LENGTH = 16  # the shortest bucket


@dataclass(frozen=True)
class RecordLayout:
    """Index arrays (int64 unless said) over a batch's tokens flattened as row * width + position.

    buckets: per bucket, [n, L] flat indices of its records' tokens; a record shorter than L
        repeats its last token (causal attention never lets a real token see what follows it,
        and the outputs there are never read), and the rows added to make n a power of two
        repeat flat index 0 (their outputs are never read either).
    inverse: [b * width], the slot of each token in the buckets' outputs concatenated (each
        bucket flattened to [n * L]); pads point at slot 0, whose output they never need.
    tokens: [total], the flat indices of the real tokens, record after record (flash-attn's
        varlen layout); cu_seqlens: [records + 1] int32, their cumulative lengths; max_length:
        the longest record.
    """

    buckets: tuple[np.ndarray, ...]
    inverse: np.ndarray
    tokens: np.ndarray
    cu_seqlens: np.ndarray
    max_length: int


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, int(n - 1).bit_length()))


def record_layout(segments: np.ndarray) -> RecordLayout:
    """The RecordLayout of a batch whose segment_ids are `segments` [b, t] (-1 on pads; each row's
    records contiguous and numbered from 0, as collate_rows writes them)."""
    b, t = segments.shape
    flat = segments.reshape(-1)
    real = np.flatnonzero(flat >= 0)
    # a record starts where the segment id (or the row) changes among the real tokens
    starts = real[np.r_[True, (np.diff(flat[real]) != 0) | (np.diff(real // t) != 0)]]
    lengths = np.diff(np.r_[np.searchsorted(real, starts), len(real)])
    sizes = np.array([_pow2(int(n), MIN_LENGTH) for n in lengths])
    buckets, slot = [], np.zeros(b * t, dtype=np.int64)
    offset = 0
    for size in np.unique(sizes):
        members = np.flatnonzero(sizes == size)
        rows = _pow2(len(members))
        positions = np.minimum(np.arange(size)[None, :], lengths[members, None] - 1)  # [n, L]: repeat the last
        gather = np.zeros((rows, size), dtype=np.int64)
        gather[: len(members)] = starts[members, None] + positions
        for k, m in enumerate(members):
            slot[starts[m]:starts[m] + lengths[m]] = offset + k * size + np.arange(lengths[m])
        buckets.append(gather)
        offset += rows * size
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return RecordLayout(tuple(buckets), slot, real.astype(np.int64), cu, int(lengths.max()))


def attention_cost(layout: RecordLayout) -> tuple[int, int]:
    """(query-key pairs the buckets compute, pairs the records need: sum of len^2), for benchmarks."""
    lengths = np.diff(layout.cu_seqlens.astype(np.int64))
    return sum(g.shape[0] * g.shape[1] ** 2 for g in layout.buckets), int((lengths ** 2).sum())
