"""MoraLinear: MoRA's forward in MLX (the math and its float64 oracle: pissa.adapters.kinds.mora).

y = base(x) + decompress(M compress(x)), with M [r_hat, r_hat] trainable and the base frozen and
unchanged. Compression and decompression are reshapes and sums, never dense matrices; delta()
runs the same forward on the identity, so merging uses exactly the function that was trained.
"""

from __future__ import annotations

from pissa_mlx.layers.base import AdapterLinear, weight_shape

import mlx.core as mx
from mlx import nn
from pissa.adapters.kinds import mora


def _wrap(x: mx.array, length: int) -> mx.array:
    """x[..., j mod n] for j < length: wrap padding (length > n) or truncation."""
    n = x.shape[-1]
    if length == n:
        return x
    return mx.concatenate([x] * -(-length // n), axis=-1)[..., :length]


def _fold(y: mx.array, n_out: int) -> mx.array:
    """The rotation type's output map: tile y to n_out when it is shorter, otherwise sum its
    entries modulo n_out (pissa.adapters.kinds.mora.fold_matrix)."""
    length = y.shape[-1]
    if length <= n_out:
        return _wrap(y, n_out)
    chunks = -(-length // n_out)
    y = mx.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, chunks * n_out - length)])
    return y.reshape(*y.shape[:-1], chunks, n_out).sum(axis=-2)


class MoraLinear(AdapterLinear):
    KIND = "mora"
    PARAMS = ("mora_M",)

    def __init__(self, base: nn.Linear, M: mx.array, mora_type: str, dropout: float = 0.0):
        if M.ndim != 2 or M.shape[0] != M.shape[1] or (mora_type == "rotation" and M.shape[0] % 2):
            raise ValueError(f"MoRA's M {tuple(M.shape)} must be square (and of even size for rotation)")
        super().__init__(base, dropout)
        self.mora_M = M
        self.mora_type = mora_type
        self.n_out, n_in = weight_shape(base)
        self.n = M.shape[0]
        self.length = mora.padded_length(n_in, self.n)
        if mora_type == "rotation":
            cos, sin = mora.rotation_tables(self.length // self.n, self.n)
            # Plain attributes, not module members: fixed by the shape, so neither parameters
            # nor saved; mx.compile treats them as constants.
            object.__setattr__(self, "_cos", mx.array(cos.astype("float32")))
            object.__setattr__(self, "_sin", mx.array(sin.astype("float32")))

    @classmethod
    def from_params(cls, base: nn.Linear, params: tuple[mx.array, ...], spec) -> "MoraLinear":
        (M,) = params
        problem = mora.wrong_shape(spec, weight_shape(base), M.shape)
        if problem:
            raise ValueError(problem)
        return cls(base, M, spec.option("mora_type"), spec.dropout)

    def update(self, x: mx.array) -> mx.array:
        """decompress(M compress(x)) for x [..., in] -> [..., out]."""
        M = self.mora_M.astype(x.dtype)
        blocks = _wrap(x, self.length)
        blocks = blocks.reshape(*blocks.shape[:-1], self.length // self.n, self.n)
        if self.mora_type == "sharing":
            return _wrap(blocks.sum(axis=-2) @ M.T, self.n_out)
        half = self.n // 2
        turned = mx.concatenate([-blocks[..., half:], blocks[..., :half]], axis=-1)
        rotated = blocks * self._cos.astype(x.dtype) + turned * self._sin.astype(x.dtype)
        y = rotated @ M.T
        return _fold(y.reshape(*y.shape[:-2], self.length), self.n_out)

    def delta(self) -> mx.array:
        """dW [out, in] in the base weight's dtype: the update applied to the identity."""
        n_in = weight_shape(self.base)[1]
        return self.update(mx.eye(n_in, dtype=self.mora_M.dtype)).T.astype(self._dtype())

    def _extra_repr(self) -> str:
        return f"r_hat={self.n}, type={self.mora_type}, merged={self.merged}"


LAYER = MoraLinear
