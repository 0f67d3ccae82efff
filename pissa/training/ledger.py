"""The losses of a run's steps, read from the device only when they are logged (pissa.training.loop).

A step's loss sums stay where the backend computed them (a torch tensor on the GPU, an MLX array)
until the ledger is flushed: every --log-every steps, before an eval or a checkpoint, and at the
end. Reading a device value makes the host wait for the device, so a GPU is never waited for inside
a step, and with --log-every N only once every N steps. A flush sums the steps' losses over the
ranks in one collective (every rank flushes at the same steps), checks that each is finite (a
checkpoint is never written after a loss nobody looked at), and writes their metrics.jsonl rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pissa import dist
from pissa.errors import PissaError


@dataclass
class Pending:
    step: int         # 1-based, as metrics.jsonl counts
    lr: float
    tokens: int       # the step's real tokens (no pads), all ranks
    count: int        # its labelled tokens, all ranks: the loss's denominator
    sums: list[Any]   # this rank's loss sum of each micro-batch, as the backend returned it
    at: float         # time.perf_counter() when the step ended


@dataclass
class Ledger:
    """Collects steps, flushes them. on_nan(step, loss) is called before the PissaError a
    non-finite loss raises; log(row) writes a metrics.jsonl row (rank 0); show(loss, lr, tok_s)
    updates the progress bar."""

    group: dist.Group
    log: Callable[[dict], None]
    show: Callable[[float, float, float], None]
    on_nan: Callable[[int, float], str]
    t0: float = field(default_factory=time.perf_counter)
    tokens_seen: int = 0
    loss: float = float("nan")
    pending: list[Pending] = field(default_factory=list)

    def add(self, step: int, lr: float, tokens: int, count: int, sums: list[Any]) -> None:
        self.tokens_seen += tokens
        self.pending.append(Pending(step, lr, tokens, count, sums, time.perf_counter()))

    def flush(self) -> None:
        """Read the pending steps' losses (the host waits for the device here, once), sum them over
        the ranks, and log them. Raises PissaError, naming the first step, for a NaN or inf loss."""
        if not self.pending:
            return
        local = np.array([sum(float(s) for s in p.sums) for p in self.pending])
        with self.group.guard(f"step {self.pending[-1].step}"):
            totals = np.atleast_1d(self.group.all_sum(local))
        seen = self.tokens_seen - sum(p.tokens for p in self.pending)
        for p, total in zip(self.pending, totals):
            self.loss = float(total) / max(p.count, 1)
            if not math.isfinite(self.loss):
                self.pending.clear()
                raise PissaError(self.on_nan(p.step, self.loss))
            seen += p.tokens
            rate = seen / max(p.at - self.t0, 1e-9)
            # tokens: the real tokens of this step (pads not counted); tokens_per_s: of the run so far;
            # elapsed: seconds from the first step's start to this step's end, as the host saw it
            self.log({"step": p.step, "loss": self.loss, "lr": p.lr, "tokens": p.tokens, "tokens_per_s": rate,
                      "elapsed": p.at - self.t0})
            self.show(self.loss, p.lr, rate)
        self.pending.clear()
