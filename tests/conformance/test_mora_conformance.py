"""MoRA conformance: for the same M, numpy's dense dW (pissa.adapters.kinds.mora.delta, the oracle), the
torch forward and the MLX forward agree; one training step from the same batch gives the same M
on both backends, and the trained model gives the logits of its merged weights."""

from __future__ import annotations

import numpy as np
import pytest

from pissa.files.formats.peft import load_adapter
from pissa.adapters.kinds import mora
from pissa.adapters.spec import AdapterSpec
from tests.conformance import tolerances as tol
from tests.conftest import BACKENDS, PROMPT_IDS, rel_max_diff

FORWARD_BACKENDS = [b for b in BACKENDS if b != "numpy"]
# SmolLM2's down_proj (in > out: the fold), q_proj, k_proj (L > out), up_proj (tiling), and small
# shapes: in <= r_hat, out < r_hat, r_hat dividing nothing.
SHAPES = [(576, 1536), (576, 576), (192, 576), (1536, 576), (20, 6), (7, 31), (45, 12)]


def backend_delta(backend: str, M: np.ndarray, shape: tuple[int, int], spec: AdapterSpec, dtype: str) -> np.ndarray:
    """dW from the backend's MoraLinear: its forward applied to the identity (delta())."""
    if backend == "torch":
        import torch

        from pissa_torch import MoraLinear

        dt = {"float64": torch.float64, "float32": torch.float32}[dtype]
        base = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=dt)
        torch.nn.init.zeros_(base.weight)
        layer = MoraLinear.from_params(base, (torch.from_numpy(M).to(dt),), spec)
        with torch.no_grad():
            d_forward = layer(torch.eye(shape[1], dtype=dt)).T.numpy()
            assert np.array_equal(d_forward, layer.delta().numpy())  # merging uses the trained function
            return d_forward
    import mlx.core as mx
    from mlx import nn

    from pissa_mlx import MoraLinear

    dt = {"float64": mx.float64, "float32": mx.float32}[dtype]
    with mx.stream(mx.cpu):
        base = nn.Linear(shape[1], shape[0], bias=False)
        base.weight = mx.zeros(shape, dtype=dt)
        layer = MoraLinear.from_params(base, (mx.array(M, dtype=dt),), spec)
        d_forward = layer(mx.eye(shape[1], dtype=dt)).T
        assert mx.array_equal(d_forward, layer.delta()).item()  # merging uses the trained function
        return np.array(d_forward)


def float32_bound(spec: AdapterSpec, M: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Elementwise bound on a float32 dW, from the standard error of k-term sums of products:
    |fl(y) - y| <= gamma_k |T| |blocks| |P| with gamma_k = k eps / (1 - k eps), k the longest chain
    of roundings (the group sums or the rotation, the n-term product with M, the fold), plus two
    for rounding M and the result to float32. Derived, not fitted."""
    n_out, n_in = shape
    n = M.shape[0]
    L = mora.padded_length(n_in, n)
    P = mora.wrap_matrix(L, n_in)
    absM = np.abs(M)
    if spec.option("mora_type") == "sharing":
        k = L // n + n + 2
        bound = mora.wrap_matrix(n_out, n) @ absM @ mora.wrap_matrix(L, n).T @ P
    else:
        k = 3 + n + -(-L // n_out) + 2
        cos, sin = mora.rotation_tables(L // n, n)
        mix = np.zeros((L, L))
        for b in range(L // n):
            mix[b * n:(b + 1) * n, b * n:(b + 1) * n] = absM @ np.abs(mora.rotation(n, cos[b], sin[b]))
        bound = mora.fold_matrix(n_out, L) @ mix @ P
    gamma = k * tol.EPS32 / (1 - k * tol.EPS32)
    return gamma * bound


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
@pytest.mark.parametrize("kind", ["sharing", "rotation"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_equals_the_dense_update(backend, kind, shape):
    spec = AdapterSpec(rank=8, kind="mora", options={"mora_type": kind})
    n = mora.shapes(spec, shape)[0][0]
    M = np.random.default_rng(shape[0] * 7 + shape[1]).standard_normal((n, n))
    want = mora.delta(spec, (M,), shape)
    got64 = backend_delta(backend, M, shape, spec, "float64")
    assert np.abs(got64 - want).max() <= tol.FLOAT64_REL * np.abs(want).max()
    M32 = M.astype(np.float32).astype(np.float64)
    got32 = backend_delta(backend, M32, shape, spec, "float32")
    excess = np.abs(got32 - mora.delta(spec, (M32,), shape)) - float32_bound(spec, M32, shape)
    assert excess.max() <= 0, f"float32 dW off by {excess.max():.3g} beyond the derived bound"


# ---------------------------------------------------------------------- one training step
@pytest.fixture(scope="module")
def one_step_runs(tiny_mora, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from tests.backend_mlx.conftest import run_cli

    runs = {}
    for kind, model in tiny_mora.items():
        for backend in ("torch", "mlx"):
            out = tmp_path_factory.mktemp(f"mora-{kind}-{backend}") / "run"
            assert run_cli(backend, model, out, "--steps", "1", "--lr", "1e-2", "--warmup-ratio", "0") == 0
            runs[kind, backend] = out
    return runs


@pytest.mark.parametrize("kind", ["sharing", "rotation"])
def test_one_step_gives_the_same_m_on_both_backends(kind, one_step_runs):
    # AdamW's first step moves an entry by lr * g / (|g| + eps), eps = 1e-8: about lr wherever the
    # gradient is well above eps. The backends' float32 gradients (each a chunked, labelled-only
    # loss) differ in rounding only, which shows where |g| is near eps: measured, a few entries
    # per weight, the worst 2.1e-3 of the move on two threads and 1.05e-2 on one (layer 1 q_proj:
    # rounding follows the thread count), and 1e-5 of the move or less on every entry that moved
    # by more than 0.99 lr (99% of each weight's entries or more, 98.5% on one). So: within 5e-2
    # of the move everywhere (a flipped sign would be 2x the move), and within 1e-4 of it on the
    # entries that moved fully.
    t = load_adapter(one_step_runs[kind, "torch"] / "adapter")
    m = load_adapter(one_step_runs[kind, "mlx"] / "adapter")
    assert t.spec.kind == m.spec.kind == "mora"
    for name, (M_t,) in t.factors.items():
        (M_m,) = m.factors[name]
        moved = np.abs(M_t).max()
        assert moved > 1e-3, name
        diff = np.abs(M_t - M_m)
        full = np.abs(M_t) > 0.99 * moved
        assert diff.max() <= 5e-2 * moved, name
        assert full.mean() > 0.9 and diff[full].max() <= 1e-4 * moved, name


@pytest.mark.parametrize("kind", ["sharing", "rotation"])
def test_the_trained_model_gives_the_logits_of_its_merged_weights(kind, one_step_runs, tiny_mora, tmp_path):
    import mlx.core as mx
    import torch
    from transformers import AutoModelForCausalLM

    import pissa_mlx
    import pissa_torch
    from pissa.jobs.merge import run_merge

    adapter = one_step_runs[kind, "torch"] / "adapter"
    run_merge(str(tiny_mora[kind]), adapter, tmp_path / "merged", progress=False)
    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits.numpy()
        model, _ = pissa_torch.load(tiny_mora[kind], adapter)
        ours = model(ids).logits.numpy()
        pissa_torch.merge(model)
        in_place = model(ids).logits.numpy()
        base = AutoModelForCausalLM.from_pretrained(tiny_mora[kind], dtype=torch.float32)(ids).logits.numpy()
    mlx_model, _ = pissa_mlx.load(tiny_mora[kind], adapter)
    theirs = np.array(mlx_model(mx.array(PROMPT_IDS)))
    assert rel_max_diff(ours, merged) < 1e-5
    assert rel_max_diff(in_place, merged) < 1e-5
    assert rel_max_diff(theirs, merged) < 1e-5
    assert rel_max_diff(ours, base) > 1e-4  # the step changed the model
