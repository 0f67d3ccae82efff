"""MoraLinear: MoRA's forward in torch (the math and its float64 oracle: pissa.adapters.kinds.mora).

y = base(x) + decompress(M compress(x)), with M [r_hat, r_hat] trainable and the base frozen and
unchanged. Compression and decompression are reshapes and sums, never dense matrices, so a step
costs O(tokens * (in + out + L * r_hat)); delta() runs the same forward on the identity, so
merging uses exactly the function that was trained.
"""

from __future__ import annotations

import torch
from torch import nn

from pissa.adapters.kinds import mora
from pissa_torch.layers.base import AdapterLinear, weight_shape
from pissa_torch.quantized import compute_dtype


def _wrap(x: torch.Tensor, length: int) -> torch.Tensor:
    """x[..., j mod n] for j < length: wrap padding (length > n) or truncation."""
    n = x.shape[-1]
    if length == n:
        return x
    return torch.cat([x] * -(-length // n), dim=-1)[..., :length]


def _fold(y: torch.Tensor, n_out: int) -> torch.Tensor:
    """The rotation type's output map: tile y to n_out when it is shorter, otherwise sum its
    entries modulo n_out (pissa.adapters.kinds.mora.fold_matrix)."""
    length = y.shape[-1]
    if length <= n_out:
        return _wrap(y, n_out)
    chunks = -(-length // n_out)
    y = nn.functional.pad(y, (0, chunks * n_out - length))
    return y.view(*y.shape[:-1], chunks, n_out).sum(dim=-2)


class MoraLinear(AdapterLinear):
    KIND = "mora"
    PARAMS = ("mora_M",)

    def __init__(self, base: nn.Module, M: torch.Tensor, mora_type: str, dropout: float = 0.0):
        super().__init__(base, dropout)
        if M.ndim != 2 or M.shape[0] != M.shape[1] or (mora_type == "rotation" and M.shape[0] % 2):
            raise ValueError(f"MoRA's M {tuple(M.shape)} must be square (and of even size for rotation)")
        self.mora_M = nn.Parameter(M.to(base.weight.device))
        self.mora_type = mora_type
        self.n = M.shape[0]
        self.length = mora.padded_length(self.in_features, self.n)
        if mora_type == "rotation":
            cos, sin = mora.rotation_tables(self.length // self.n, self.n)
            # Buffers follow .to(device); not persistent, since they are fixed by the shape.
            self.register_buffer("cos", torch.from_numpy(cos).to(base.weight.device, torch.float32), persistent=False)
            self.register_buffer("sin", torch.from_numpy(sin).to(base.weight.device, torch.float32), persistent=False)

    @classmethod
    def from_params(cls, base: nn.Module, params: tuple[torch.Tensor, ...], spec) -> "MoraLinear":
        (M,) = params
        problem = mora.wrong_shape(spec, weight_shape(base), tuple(M.shape))
        if problem:
            raise ValueError(problem)
        return cls(base, M, spec.option("mora_type"), spec.dropout)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """decompress(M compress(x)) for x [..., in] -> [..., out]."""
        M = self.mora_M.to(x.dtype) if self.mora_M.dtype != x.dtype else self.mora_M
        blocks = _wrap(x, self.length).unflatten(-1, (self.length // self.n, self.n))
        if self.mora_type == "sharing":
            return _wrap(blocks.sum(dim=-2) @ M.T, self.out_features)
        half = self.n // 2
        rotated = blocks * self.cos.to(x.dtype) + torch.cat([-blocks[..., half:], blocks[..., :half]], dim=-1) \
            * self.sin.to(x.dtype)
        return _fold((rotated @ M.T).flatten(-2), self.out_features)

    def delta(self) -> torch.Tensor:
        """dW [out, in] in the base's compute dtype: the update applied to the identity."""
        eye = torch.eye(self.in_features, device=self.mora_M.device, dtype=self.mora_M.dtype)
        return self.update(eye).T.to(compute_dtype(self.base))

    def extra_repr(self) -> str:
        return f"r_hat={self.n}, type={self.mora_type}, merged={self.merged}"


LAYER = MoraLinear
