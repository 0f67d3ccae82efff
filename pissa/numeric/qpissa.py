"""QPiSSA: PiSSA with a quantised residual, refined over several iterations.

For one weight W (paper, Appendix E; like LoftQ but starting from PiSSA's principal part):
    R = W
    repeat T times:
        A, B = PiSSA factors of R (rank r, scale s)
        Q = quantise(W - s B A)
        R = W - deq(Q)
    keep the last A, B and Q.
With T = 1 this is plain QPiSSA: the principal part of W in the adapter and its quantised
residual as the frozen base.

The error after each iteration is E_t = || W - deq(Q_t) - s B_t A_t ||_* (nuclear norm), and
QLoRA's is || W - deq(quantise(W)) ||_*; the reduction is 1 - E / E_qlora.

Everything but the quantiser runs in the spec's compute dtype; the quantiser takes the residual
rounded to the storage dtype, as it would be stored, and quantises it as bitsandbytes and MLX
quantise a weight of that dtype (pissa.numeric.quant): QLoRA's error likewise quantises W as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pissa.numeric.decompose import residual, stored
from pissa.errors import PissaError
from pissa.numeric.dtypes import np_dtype
from pissa.numeric.ops import Array, Ops
from pissa.numeric.quant import QTensor, QuantScheme

# The defaults of `pissa init --quantize`, chosen by the model's function: on SmolLM2-135M (nf4)
# the step-0 KL per token to the original model falls 16% below QLoRA's at rank 16 and one
# iteration, 62% at rank 64 and five (docs/benchmarks.md, "QPiSSA's defaults").
DEFAULT_RANK = 64
DEFAULT_ITERS = 5


@dataclass
class QFactors:
    """One target's QPiSSA result: A [r, in], B [out, r] in the storage dtype; the quantised
    residual; the error after each iteration and QLoRA's error (nuclear norms, float)."""

    A: np.ndarray
    B: np.ndarray
    quantized: QTensor
    errors: list[float] = field(default_factory=list)
    error_qlora: float = 0.0

    def entry(self) -> dict:
        """This matrix's quant_report.json entry."""
        return {"error_qpissa": self.errors[-1], "error_qlora": self.error_qlora,
                "reduction": 1.0 - self.errors[-1] / self.error_qlora if self.error_qlora else 0.0,
                "error_qpissa_by_iteration": list(self.errors),
                "reduction_by_iteration": [1.0 - e / self.error_qlora if self.error_qlora else 0.0
                                           for e in self.errors]}


def check_backend(ops: Ops, s: QuantScheme) -> None:
    """Refuse a scheme the backend cannot quantise.

    Raises:
        PissaError: naming the scheme, the backend, and the schemes it does have.
    """
    have = tuple(ops.quant_schemes)
    if s.name not in have:
        hint = f"choose one of: {', '.join(have)}" if have else "use --backend numpy or torch"
        raise PissaError(f"the {ops.name} backend cannot quantise {s.name}; {hint}")


def _nuclear(x, ops: Ops) -> float:
    vals = ops.svdvals(x)
    return float(np.asarray(ops.to_numpy(vals), dtype=np.float64).sum())


def iterate(W: np.ndarray, factor: Callable[[Array], tuple[Array, Array]], scale: float, dtype: str,
            compute_dtype: str, ops: Ops, s: QuantScheme, iters: int) -> QFactors:
    """QPiSSA init of one weight W [out, in] (float32 on the host); see the module docstring.

    Args:
        factor: the init's split of a matrix R [out, in] (an ops array in compute_dtype) into
            (A [r, in], B [out, r]) already rounded to the storage dtype (pissa.adapters.inits).
        scale: s of the adapter; dtype: its storage dtype; compute_dtype: the decomposition's.
    """
    errors: list[float] = []
    with ops.scope(compute_dtype):
        Wd = ops.asarray(W, compute_dtype)
        _, deq_w = ops.quantize(ops.round_to(Wd, dtype), s, dtype)
        error_qlora = _nuclear(Wd - deq_w, ops)
        del deq_w
        R = Wd
        for _ in range(iters):
            A, B = factor(R)
            q, deq = ops.quantize(ops.round_to(residual(Wd, A, B, scale), dtype), s, dtype)
            R = Wd - deq
            errors.append(_nuclear(R - (B @ A) * scale, ops))
        A, B = ops.to_numpy(A), ops.to_numpy(B)
    out_dtype = np_dtype(dtype)
    return QFactors(A=stored(A, out_dtype), B=stored(B, out_dtype), quantized=q, errors=errors,
                    error_qlora=error_qlora)


def summarize(entries: dict[str, dict]) -> dict:
    """Per module type (q_proj, ...) and overall: mean errors and mean reduction, and the mean
    reduction after each iteration."""
    groups: dict[str, list[dict]] = {}
    for module, e in entries.items():
        groups.setdefault(module.rsplit(".", 1)[-1], []).append(e)
    groups["all"] = list(entries.values())

    def mean(xs):
        return float(np.mean(xs)) if xs else 0.0

    out = {}
    for g, es in groups.items():
        iters = len(es[0]["reduction_by_iteration"]) if es else 0
        out[g] = {"matrices": len(es), "error_qpissa": mean([e["error_qpissa"] for e in es]),
                  "error_qlora": mean([e["error_qlora"] for e in es]),
                  "reduction": mean([e["reduction"] for e in es]),
                  "reduction_by_iteration": [mean([e["reduction_by_iteration"][t] for e in es]) for t in range(iters)]}
    return out


def table(report: dict) -> str:
    """The report's per-module-type summary as a text table."""
    rows = report["by_module_type"]
    iters = report["quant_iters"]
    head = f"{'module':<12} {'n':>4} {'E_qlora':>10} {'E_qpissa':>10} {'reduction':>10}"
    if iters > 1:
        head += f"  {'after 1 iter':>12}"
    lines = [f"QPiSSA {report['scheme']} group {report['group_size']}, rank {report['rank']}, "
             f"{iters} iteration(s) (nuclear-norm error against QLoRA):", head]
    for g, v in rows.items():
        line = (f"{g:<12} {v['matrices']:>4} {v['error_qlora']:>10.3f} {v['error_qpissa']:>10.3f} "
                f"{100 * v['reduction']:>9.1f}%")
        if iters > 1:
            line += f"  {100 * v['reduction_by_iteration'][0]:>11.1f}%"
        lines.append(line)
    return "\n".join(lines)
