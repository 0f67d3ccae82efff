"""QPiSSA conformance across backends: torch and MLX, run directly against each other on the
affine scheme that both can run, give the same A, B and deq(Q(W_res)).

Each backend is also checked against the numpy reference in tests/backend_*/test_qpissa.py; this
is the direct check that a Mac and a CUDA server build the same quantised model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("mlx.core")

from pissa.adapters.spec import AdapterSpec, parse_targets  # noqa: E402
from tests.conformance.qpissa_checks import assert_same_init, init_each  # noqa: E402
from tests.conftest import write_tiny_llama  # noqa: E402


@pytest.mark.parametrize("name,group", [("affine4", 32), ("int8", 64)])
def test_torch_and_mlx_qpissa_inits_agree_on_a_tiny_model(tmp_path, name, group):
    base = write_tiny_llama(tmp_path / "base")
    assert_same_init(*init_each(base, tmp_path, ("torch", "mlx"), AdapterSpec(rank=8, init="pissa-fast"),
                                name, group, iters=3))


@pytest.mark.slow
def test_torch_and_mlx_qpissa_inits_agree_on_smollm2(tmp_path):
    """Full SVD at the float64 default, 2 iterations, affine4 group 64, on one real matrix of each
    shape (q_proj 576x576, k_proj 192x576, gate_proj 1536x576, down_proj 576x1536)."""
    spec = AdapterSpec(rank=16, init="pissa",
                       targets=parse_targets(r"model\.layers\.21\.(self_attn\.(q|k)|mlp\.(gate|down))_proj"))
    assert_same_init(*init_each("smollm2-135m", tmp_path, ("torch", "mlx"), spec, "affine4", 64, iters=2))
