"""The numpy reference decomposition, checked against plain float64 numpy."""

import numpy as np
import pytest

from pissa.adapters.inits import decompose
from pissa.numeric.decompose import sketch_matrix, svd_randomized
from pissa.numeric.ops import NumpyOps
from pissa.adapters.spec import AdapterSpec

OPS = NumpyOps()


def spectral_matrix(m, n, decay=1.0, seed=0):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u / np.arange(1, k + 1) ** decay) @ v.T).astype(np.float32)


def f64(x):
    return np.asarray(x, dtype=np.float64)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
@pytest.mark.parametrize("alpha, rslora", [(None, False), (32.0, False), (8.0, True)])
def test_full_svd_matches_float64_numpy(shape, alpha, rslora):
    W = spectral_matrix(*shape)
    spec = AdapterSpec(rank=12, alpha=alpha, use_rslora=rslora)
    f = decompose(W, "m", spec, OPS)
    u, s, vt = np.linalg.svd(f64(W), full_matrices=False)
    best = (u[:, :12] * s[:12]) @ vt[:12]
    scale = max(np.abs(W).max(), 1e-30)
    assert f.A.shape == (12, shape[1]) and f.B.shape == (shape[0], 12) and f.residual.shape == shape
    assert np.allclose(f.spectrum, s[:12], rtol=1e-12, atol=0)
    assert np.abs(spec.scale * f64(f.B) @ f64(f.A) - best).max() / scale < 1e-6
    # W_res + s*B@A reproduces W.
    assert np.abs(f64(f.residual) + spec.scale * f64(f.B) @ f64(f.A) - f64(W)).max() / scale < 1e-6
    # The residual holds exactly the discarded part of the spectrum.
    assert np.allclose(np.linalg.svd(f64(f.residual), compute_uv=False)[:5], s[12:17], rtol=1e-4)


def test_signs_are_canonical_and_factors_balanced():
    W = spectral_matrix(80, 120)
    spec = AdapterSpec(rank=8, alpha=4)
    f = decompose(W, "m", spec, OPS)
    B = f64(f.B)
    rows = np.abs(B).argmax(axis=0)
    assert (B[rows, np.arange(8)] > 0).all()
    # A = sqrt(S/s) V^T and B = U sqrt(S/s): equal column / row norms sqrt(S/s).
    want = np.sqrt(f.spectrum / spec.scale)
    assert np.allclose(np.linalg.norm(B, axis=0), want, rtol=1e-5)
    assert np.allclose(np.linalg.norm(f64(f.A), axis=1), want, rtol=1e-5)


def test_randomized_error_falls_with_niter():
    # A slowly decaying spectrum, where power iterations matter most.
    W = f64(spectral_matrix(300, 500, decay=0.3))
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    r = 16
    best = (u[:, :r] * s[:r]) @ vt[:r]
    errs = []
    for niter in (0, 1, 2, 4, 8, 16):
        omega = sketch_matrix(500, r + 8, seed=0, name="m")
        U, S, Vt = svd_randomized(W, omega, niter, OPS)
        approx = (U[:, :r] * S[:r]) @ Vt[:r]
        errs.append(np.linalg.norm(approx - best, 2) / s[0])
    assert all(b <= a * 1.0001 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 4, errs


@pytest.mark.slow
def test_randomized_error_falls_with_niter_on_real_weights(smollm2_matrices):
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj"):
        W = f64(smollm2_matrices[name])
        s = np.linalg.svd(W, compute_uv=False)
        errs = []
        for niter in (0, 1, 2, 4, 8):
            spec = AdapterSpec(rank=16, init="pissa-fast", niter=niter, compute_dtype="float64")
            f = decompose(W.astype(np.float32), name, spec, OPS)
            # Error of the rank-16 approximation in the spectral norm, against the optimum s[16].
            errs.append(np.linalg.norm(f64(f.residual), 2) / s[16] - 1)
        assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), (name, errs)
        assert errs[-1] < errs[0], (name, errs)


def test_randomized_is_seeded_and_name_dependent():
    W = spectral_matrix(64, 96, decay=0.2)
    spec = AdapterSpec(rank=4, init="pissa-fast", niter=0, oversampling=0)
    a = decompose(W, "x", spec, OPS)
    b = decompose(W, "x", spec, OPS)
    c = decompose(W, "y", spec, OPS)
    d = decompose(W, "x", AdapterSpec(rank=4, init="pissa-fast", niter=0, oversampling=0, seed=1), OPS)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.residual, b.residual)
    assert not np.allclose(a.A, c.A) and not np.allclose(a.A, d.A)


def test_residual_is_computed_from_the_stored_factors():
    """bf16 factors: W_res must absorb their rounding. PEFT rounds the factors after computing
    W_res from the unrounded ones, and then misses W by about 6e-4."""
    # A decaying spectrum like real weights': the residual is small next to the principal part,
    # so rounding the factors would dominate the error if W_res did not absorb it.
    W = spectral_matrix(128, 192, decay=1.0)
    spec = AdapterSpec(rank=16, dtype="bfloat16")
    f = decompose(W, "m", spec, OPS)
    assert f.A.dtype.name == "bfloat16" and f.residual.dtype.name == "bfloat16"
    ours = f64(f.residual) + spec.scale * f64(f.B) @ f64(f.A)
    # Naive: residual from the unrounded factors, then the factors rounded.
    f32 = decompose(W, "m", AdapterSpec(rank=16), OPS)
    naive_res = f64(f32.residual).astype(np.float32).astype(f.residual.dtype)
    naive = f64(naive_res) + spec.scale * f64(f.B) @ f64(f.A)
    # Ours is limited by rounding W_res (which is small) to bf16, not by rounding A and B
    # (measured: 7.7x smaller than naive in the Frobenius norm).
    assert np.abs(ours - W).max() <= np.abs(f64(f.residual)).max() * 2.0**-8
    assert np.linalg.norm(ours - W) < np.linalg.norm(naive - W) / 4


def test_lora_init():
    W = spectral_matrix(40, 64)
    f = decompose(W, "m", AdapterSpec(rank=4, init="lora"), OPS)
    assert np.array_equal(f.residual, W) and not f.B.any()
    assert np.abs(f.A).max() <= 1 / np.sqrt(64) and f.A.std() > 0.5 / np.sqrt(3 * 64)


def test_rank_too_large():
    with pytest.raises(ValueError, match="rank 9"):
        decompose(np.zeros((8, 16), np.float32), "m", AdapterSpec(rank=9), OPS)
