"""What every backend's token loss shares: the label that carries no loss, and how many rows of
logits one chunk of the chunked cross-entropy holds (pissa_torch.loss, pissa_mlx.loss).

The output head and its cross-entropy run over the labelled positions a chunk of rows at a time, so
the [tokens x vocab] float32 logits never exist at once: a chunk holds about CHUNK_ELEMENTS logits
(64 MiB of float32), as a power of two of rows so that a compiled graph (MLX) sees few shapes.
Measured on the CPU (MLX, SmolLM2's 49152 vocabulary, compiled, forward and backward): the head
and loss peaked at 2.3 GiB on full logits and 0.37 GiB in chunks of 128 rows, and ran faster.
"""

from __future__ import annotations

IGNORE = -100             # label of tokens that carry no loss (PyTorch's cross_entropy default ignore_index)
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB of float32 (256 rows of a 49k vocabulary)
MIN_ROWS, MAX_ROWS = 32, 4096


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of the chunked cross-entropy for a vocabulary of `vocab` words: the largest
    power of two in [MIN_ROWS, MAX_ROWS] whose logits stay within CHUNK_ELEMENTS (MIN_ROWS when
    even those do not)."""
    rows = MIN_ROWS
    while rows < MAX_ROWS and 2 * rows * vocab <= CHUNK_ELEMENTS:
        rows *= 2
    return rows
