"""mlx.launch's ranks for pissa: mlx.core.distributed's group (the ring backend on CPUs and across
Macs, or whichever backend mlx.launch set up), checked against the size the launcher announced.

MLX collectives have no timeout, so the guard runs a watchdog (pissa.dist.watchdog) around
them; a peer that dies makes the ring fail at once ("[ring] connection to a peer was lost"),
which the guard turns into one LostContact line.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

import mlx.core as mx
from pissa.dist import lost_contact, watchdog
from pissa.errors import PissaError

_COMM = ("[ring]", "[jaccl]", "[nccl]", "[mpi]", "peer")


class MlxGroup:
    launcher = "mlx.launch"

    def __init__(self, size: int, timeout: float):
        self.timeout = timeout
        try:
            self.group = mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise PissaError(f"could not join mlx.launch's group ({e}); start pissa with mlx.launch") from None
        self.rank, self.size = self.group.rank(), self.group.size()
        # One machine per rank is the common case; with -n N on one machine the rank is local too.
        self.local_rank = self.rank
        if self.size != size:  # mlx issue 3442: a silent group of one
            raise PissaError(f"mlx.launch started {size} processes but mx.distributed.init() joined a group of "
                             f"{self.size}; check the hostfile (MLX_HOSTFILE={os.environ.get('MLX_HOSTFILE')})")

    def all_sum(self, x) -> np.ndarray:
        # On the CPU stream: a Mac's GPU has no float64, and the ring runs on the CPU anyway.
        y = mx.distributed.all_sum(mx.array(np.asarray(x, dtype=np.float64), dtype=mx.float64), group=self.group,
                                   stream=mx.cpu)
        return np.array(y)

    @contextlib.contextmanager
    def guard(self, what: str, timed: bool = True):
        with watchdog(self, what) if timed else contextlib.nullcontext():
            try:
                yield
            except RuntimeError as e:
                if not any(s in str(e) for s in _COMM):
                    raise
                raise lost_contact(self, what, str(e).strip().splitlines()[0]) from None


def make_group(rank: int, size: int, timeout: float) -> MlxGroup:
    group = MlxGroup(size, timeout)
    if group.rank != rank:
        raise PissaError(f"MLX_RANK says rank {rank}, mx.distributed.init() says {group.rank}")
    return group
