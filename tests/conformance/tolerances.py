"""Every tolerance of the conformance suite, in one table, with where each comes from.

Conformance compares a backend's init with the numpy float64 reference.
"""

from __future__ import annotations

import numpy as np

# float64 compute: each backend runs LAPACK in float64 and rounds to the float32 storage dtype
# once at the end, so canonical A, B and W_res differ by float32 rounding flips at most
# (~6e-8 relative to the entry); the issue fixes the bound at 1e-6 x max|W|.
FLOAT64_REL = 1e-6

# W_res + s*B@A == W, relative to max|W|, for float32 storage (2^-24 rounding of two terms).
RECONSTRUCTION_REL = 1e-6

# float32 compute. A float32 SVD is backward stable: it is the exact SVD of W + E with
# ||E||_2 <= c * eps32 * ||W||_2. By Davis-Kahan, the top-r singular subspaces then rotate by
# about ||E|| / gap_r, gap_r = sigma_r - sigma_{r+1}, so B@A (the rank-r truncation) moves by
# about ||E|| * (1 + sigma_1 / gap_r), and a single singular pair i by ||E|| / min gap around i.
# c is LAPACK's backward-error constant, which grows like sqrt(n); it is fixed from that bound,
# not fitted: c = sqrt(max(m, n)). Measured on SmolLM2 (numpy float32 vs float64, r=8): the
# largest difference was 8e-5 of this bound for B@A and 3e-2 of it for the randomised SVD's
# factors, so a real error (a sign flip, a wrong rank, a float16 cast) fails it.
EPS32 = float(np.finfo(np.float32).eps)

# A matrix whose smallest relative gap among the top r+1 singular values is below this has
# factors that float32 cannot pin down: more than 1e-3 relative change for a rounding-level
# perturbation. Its factors are skipped (B@A and W_res are still checked), and the count reported.
TINY_REL_GAP = EPS32 * 1e3


def backward_error(shape: tuple[int, int], sigma1: float) -> float:
    return float(np.sqrt(max(shape))) * EPS32 * sigma1


def float32_product_tol(spectrum: np.ndarray, r: int, shape: tuple[int, int]) -> float:
    """Bound on max|s*B@A - reference| (and on W_res) at float32 compute, from the gap at r."""
    gap = spectrum[r - 1] - spectrum[r] if r < len(spectrum) else spectrum[r - 1]
    return backward_error(shape, spectrum[0]) * (1.0 + spectrum[0] / max(gap, 1e-300))


def min_gap(spectrum: np.ndarray, r: int) -> float:
    """Smallest gap between neighbours among the top r+1 singular values (each factor pair needs
    its own gaps; the last needs the gap at the rank cut)."""
    top = spectrum[: r + 1]
    return float(np.min(top[:-1] - top[1:])) if len(top) > 1 else float(top[0])


def float32_factor_tol(spectrum: np.ndarray, r: int, shape: tuple[int, int], scale: float) -> float:
    """Bound on max|A - A_ref| and max|B - B_ref| at float32 compute. The factors carry
    sqrt(sigma_i / s), so a unit-vector perturbation d gives about sqrt(sigma_1 / s) * d."""
    d = backward_error(shape, spectrum[0]) / max(min_gap(spectrum, r), 1e-300)
    return float(np.sqrt(spectrum[0] / scale) * d)


def factors_checkable(spectrum: np.ndarray, r: int) -> bool:
    return min_gap(spectrum, r) / spectrum[0] >= TINY_REL_GAP
