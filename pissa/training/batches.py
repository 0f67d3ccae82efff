"""How examples become micro-batches, the same on every backend and a pure function of the data's
lengths, the options and the seed (so resuming needs no loader state, and torch and MLX draw the
same batches in the same order).

Three ways, each of them a sequence of epochs, each epoch a shuffle of the examples (seeded by
--seed and the epoch) cut into micro-batches of --batch-size rows:
- "packed" (the default): the shuffled examples are packed into rows of at most --max-seq-len
  tokens (first fit among the last OPEN_ROWS rows still open; an example is never split), each
  example's positions restarting at 0, and attention kept inside each example (block-diagonal
  causal: the backends' business, from position_ids and segment_ids). A row is a unit of
  --batch-size, as TRL's packing counts it.
- "padded": one example per row, right-padded to the longest of its micro-batch (what pissa
  always did; --no-packing).
- "grouped": one example per row, but each micro-batch drawn from a window of similar lengths
  (what a backend that cannot pack a model exactly falls back to, as mlx-lm batches).

In a packed row the first token of each example carries no label: position t predicts token t+1,
and the token after an example's last belongs to the next example. The loss over a packed batch is
then the sum of the losses of the same examples unpacked.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pissa.numeric.loss import IGNORE

from pissa.training.data import Example

OPEN_ROWS = 8        # rows a packed example may still go to: first fit among the newest 8
GROUP_WINDOW = 64    # grouped: micro-batches are cut from windows of this many micro-batches' examples


def pack(order: Sequence[int], lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Rows of example indices, in `order`, each row's lengths summing to at most max_len: each
    example goes to the first of the newest OPEN_ROWS rows it fits in, else starts a new row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        first = len(rows) - min(len(rows), OPEN_ROWS)
        for r in range(first, len(rows)):
            if room[r] >= n:
                rows[r].append(int(i))
                room[r] -= n
                break
        else:
            rows.append([int(i)])
            room.append(max_len - n)
    return rows


@dataclass
class Plan:
    """The micro-batches of a run: rows of example indices, epoch after epoch.

    Planning costs the same in any epoch: the plan of one epoch is kept (the one the run is in),
    and of the others only their micro-batch counts, so finding micro-batch k of epoch 10 packs
    nothing once the run is in epoch 10, and memory stays one epoch's plan.

    Args:
        lengths: each example's token count (at most max_len).
        batch_size: rows per micro-batch (with batch_tokens: at most, or None for no cap); max_len:
            a packed row's capacity; seed: the shuffle's.
        mode: "packed", "padded" or "grouped" (the module docstring).
        batch_tokens: cut micro-batches by real tokens instead (cut()), as GPU users size steps.
    """

    lengths: Sequence[int]
    batch_size: int | None
    max_len: int
    seed: int = 0
    mode: str = "packed"
    batch_tokens: int | None = None
    _kept: tuple[int, list[list[list[int]]]] | None = field(default=None, repr=False)
    _ends: list[int] = field(default_factory=list, repr=False)  # micro-batches in epochs 0..e, cumulative

    def epoch(self, e: int) -> list[list[list[int]]]:
        """Epoch e's micro-batches, each a list of rows of example indices."""
        if self._kept is None or self._kept[0] != e:
            self._kept = (e, self._make(e))
            if e == len(self._ends):
                self._ends.append((self._ends[-1] if self._ends else 0) + len(self._kept[1]))
        return self._kept[1]

    def _end(self, e: int) -> int:
        """The index of the first micro-batch after epoch e (each earlier epoch planned once)."""
        while len(self._ends) <= e:
            self.epoch(len(self._ends))
        return self._ends[e]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, micro-batch within it) of micro-batch `index` of the endless stream of epochs."""
        e = bisect.bisect_right(self._ends, index)
        while e == len(self._ends) and self._end(e) <= index:
            e += 1
        return e, index - (self._ends[e - 1] if e else 0)

    def micro(self, index: int) -> list[list[int]]:
        """The rows of micro-batch `index` of the endless stream of epochs."""
        e, k = self.locate(index)
        return self.epoch(e)[k]

    def micro_batches(self, epochs: int) -> int:
        """How many micro-batches `epochs` whole epochs hold."""
        return self._end(epochs - 1) if epochs else 0

    def _make(self, e: int) -> list[list[list[int]]]:
        n, bs = len(self.lengths), self.batch_size
        order = np.random.default_rng([self.seed, e]).permutation(n)
        if self.mode == "packed":
            rows = pack(order, self.lengths, self.max_len)
        elif self.mode == "grouped":
            rows = []
            window = GROUP_WINDOW * (bs or max(1, self.batch_tokens // self.max_len))
            for start in range(0, n, window):
                part = order[start:start + window]
                rows += [[int(i)] for i in sorted(part, key=lambda i: self.lengths[i])]
        elif self.batch_tokens:
            rows = [[int(i)] for i in order]
        else:
            # pissa's padded batches as they always were: n // bs micro-batches an epoch (the rest
            # is left out), and fewer examples than a batch repeat to fill it.
            if n < bs:
                return [[[int(i)] for i in np.resize(order, bs)]]
            rows = [[int(i)] for i in order[: (n // bs) * bs]]
        batches = cut(rows, [sum(self.lengths[i] for i in row) for row in rows], bs, self.batch_tokens)
        if self.mode == "grouped":  # the windows' batches in a seeded order, not shortest first
            batches = [batches[k] for k in np.random.default_rng([self.seed, e, 1]).permutation(len(batches))]
        return batches


def cut(rows: list[list[int]], sizes: Sequence[int], batch_size: int | None,
        batch_tokens: int | None = None) -> list[list[list[int]]]:
    """Consecutive micro-batches of `rows` (their real tokens: `sizes`): batch_size rows each, or
    with batch_tokens as many rows as hold at most that many real tokens (always at least one row),
    and at most batch_size rows when it is given too."""
    if not batch_tokens:
        return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    out: list[list[list[int]]] = []
    current, used = [], 0
    for row, n in zip(rows, sizes):
        if current and (used + n > batch_tokens or (batch_size and len(current) == batch_size)):
            out.append(current)
            current, used = [], 0
        current.append(row)
        used += n
    return out + [current] if current else out


def collate_rows(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays of rows of examples: input_ids, labels (IGNORE on pads and on the
    first token of each example but a row's first), attention_mask (1 on real tokens), and, when a
    row holds more than one example, position_ids (restarting at 0 for each example; pads go on
    counting) and segment_ids (each example's number in its row; -1 on pads)."""
    sizes = [sum(len(examples[i].input_ids) for i in row) for row in rows]
    width = max(sizes)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            e = examples[i]
            L = len(e.input_ids)
            ids[r, at:at + L], labels[r, at:at + L], mask[r, at:at + L] = e.input_ids, e.labels, 1
            if s:
                labels[r, at] = IGNORE  # the previous example's last position must not predict it
            positions[r, at:at + L] = np.arange(L)
            segments[r, at:at + L] = s
            at += L
        positions[r, at:] = np.arange(width - at) + (positions[r, at - 1] + 1 if at else 0)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(len(row) > 1 for row in rows):
        batch.update(position_ids=positions, segment_ids=segments)
    return batch
