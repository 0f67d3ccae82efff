"""Where the records of a packed batch lie (pissa.numeric.records): attention over the layout's buckets,
computed here in float64 numpy, is causal attention within each record, exactly; every real token
has its slot, and the buckets cost a fraction of the rows' squares on long-tailed records."""

from __future__ import annotations

import numpy as np
import pytest

from pissa.numeric.records import MIN_LENGTH, attention_cost, record_layout
from pissa.training.batches import collate_rows, pack
from pissa.training.data import Example


def segments_of(lengths: list[int], width: int) -> np.ndarray:
    rows = pack(range(len(lengths)), lengths, width)
    examples = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]
    batch = collate_rows(examples, rows, 0)
    return batch["segment_ids"] if "segment_ids" in batch else np.where(batch["attention_mask"] > 0, 0, -1)


def softmax_attention(q, k, v, allowed):
    s = q @ k.T
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def reference(q, k, v, segments, window=None):
    """Row by row, token by token: attend to the earlier tokens of the same record (within the window)."""
    b, t = segments.shape
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(t):
            if segments[r, i] < 0:
                continue
            keys = [j for j in range(i + 1) if segments[r, j] == segments[r, i] and (window is None or i - j < window)]
            flat = [r * t + j for j in keys]
            out[r * t + i] = softmax_attention(q[r * t + i][None], k[flat], v[flat], np.ones((1, len(flat)), bool))[0]
    return out


def through_layout(q, k, v, segments, window=None):
    layout = record_layout(segments)
    outs = []
    for gather in layout.buckets:
        n, length = gather.shape
        i = np.arange(length)
        allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        outs += [softmax_attention(q[g], k[g], v[g], allowed) for g in gather]
    return np.concatenate(outs)[layout.inverse], layout


@pytest.mark.parametrize("lengths, width", [
    ([3, 5, 1, 7, 16, 2, 9, 4], 16),       # several records a row, one of a single token, one as long as its row
    ([40, 3, 17, 64, 1, 1, 30, 9, 33], 64),
    ([12, 12, 12], 40),                     # one row of three, and pads
])
@pytest.mark.parametrize("window", [None, 4])
def test_bucket_attention_is_attention_within_each_record(lengths, width, window):
    segments = segments_of(lengths, width)
    b, t = segments.shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b * t, 8)) for _ in range(3))
    got, layout = through_layout(q, k, v, segments, window)
    want = reference(q, k, v, segments, window)
    real = segments.reshape(-1) >= 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-13, atol=1e-13)
    assert np.array_equal(np.sort(layout.tokens), np.flatnonzero(real))
    assert sorted(np.diff(layout.cu_seqlens)) == sorted(lengths)
    assert layout.max_length == max(lengths)
    for g in layout.buckets:  # powers of two, at least MIN_LENGTH long
        assert g.shape[1] >= MIN_LENGTH and g.shape[1] & (g.shape[1] - 1) == 0 and g.shape[0] & (g.shape[0] - 1) == 0


def test_the_buckets_cost_a_fraction_of_the_rows_squares():
    """Long-tailed records (20 to 1024 tokens, 85 on average) packed into rows of 2048: the rows'
    squares cost several times what the buckets do (measured 3.4x), and the buckets at most 8x what
    the records need (2x each length, 2x the records of a bucket; measured 2.5x)."""
    rng = np.random.default_rng(0)
    lengths = [int(min(1024, 20 + rng.pareto(2.0) * 60)) for _ in range(400)]
    segments = segments_of(lengths, 2048)
    buckets, needed = attention_cost(record_layout(segments))
    rows = sum(int((row >= 0).sum()) ** 2 for row in segments)
    assert needed == sum(n * n for n in lengths)
    assert buckets <= 8 * sum(max(n, MIN_LENGTH) ** 2 for n in lengths) and rows > 3 * buckets, (rows, buckets, needed)
