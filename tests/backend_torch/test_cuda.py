"""CUDA-only checks: skipped (cleanly) without a GPU; run them on one and record the result in
docs/benchmarks.md."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pissa.adapters.inits import decompose  # noqa: E402
from pissa.numeric.ops import NumpyOps  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402
from tests.conformance import tolerances as tol  # noqa: E402
from tests.conftest import DATA  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("init", ["pissa", "pissa-fast"])
def test_cuda_float64_init_matches_the_numpy_reference(smollm2_matrices, init):
    from pissa_torch.ops import make_ops

    spec = AdapterSpec(rank=16, init=init)
    ops = make_ops("cuda")
    for name, W in smollm2_matrices.items():
        ref, got = decompose(W, name, spec, NumpyOps()), decompose(W, name, spec, ops)
        for part in ("A", "B", "residual"):
            diff = np.abs(getattr(got, part).astype(np.float64) - getattr(ref, part).astype(np.float64)).max()
            assert diff <= tol.FLOAT64_REL * np.abs(W).max(), (name, part)


def test_cuda_bf16_training_runs_and_learns(tiny_chat, tmp_path):
    import json

    from pissa.cli import main

    rc = main(["train", str(tiny_chat), "--data", str(DATA / "train.jsonl"), "--out", str(tmp_path / "run"),
               "--steps", "10", "--lr", "3e-3", "--batch-size", "4", "--max-seq-len", "128", "--device", "cuda",
               "--precision", "bf16", "--backend", "torch", "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
