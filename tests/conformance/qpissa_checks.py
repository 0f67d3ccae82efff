"""Shared QPiSSA conformance checks: init one model with several backends, then compare the
folders (A, B and deq(Q(W_res))). Used by tests/backend_torch, tests/backend_mlx and
tests/conformance, so that "torch == numpy", "mlx == numpy" and "torch == mlx" are the same check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pissa.numeric import quant
from pissa.files.formats.peft import load_adapter
from pissa.files.formats.safetensors import load as load_st
from pissa.jobs.init import run_init
from pissa.files.loaders import open_model
from pissa.adapters.spec import AdapterSpec
from tests.conformance import tolerances as tol


def init_each(model, tmp_path: Path, backends: tuple[str, ...], spec: AdapterSpec, scheme: str, group: int,
              iters: int) -> list[Path]:
    """`pissa init MODEL --quantize SCHEME` once per backend, into tmp_path/<backend>."""
    outs = []
    for backend in backends:
        run_init(str(model), tmp_path / backend, spec, backend=backend, progress=False,
                 quantize=quant.scheme(scheme, group), quant_iters=iters)
        outs.append(tmp_path / backend)
    return outs


def one_step_bound(folder: Path) -> float:
    """The largest quantisation step anywhere in a folder's quantised residual: the most a
    single code flip can move deq(Q)."""
    t = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_st(f).items()}
    nf4_gap = float(np.diff(quant.NF4_LEVELS).max())
    steps = [np.abs(v).max() * (nf4_gap if k.endswith(".absmax") else 1.0)
             for k, v in t.items() if k.endswith((".absmax", ".scales"))]
    return float(max(steps))


def assert_same_init(ref_dir: Path, got_dir: Path) -> None:
    """A and B within the float64 conformance tolerance; deq(Q(W_res)) equal but for codes moved
    by one step where a float64-rounding difference in W_res crossed a rounding boundary."""
    ref, got = load_adapter(ref_dir / "pissa_init"), load_adapter(got_dir / "pissa_init")
    ref_model, got_model = open_model(str(ref_dir)), open_model(str(got_dir))
    assert set(ref.factors) == set(got.factors)
    step, flipped, total = one_step_bound(ref_dir), 0, 0
    for m, (A, B) in ref.factors.items():
        q_ref, q_got = ref_model.get(f"{m}.weight"), got_model.get(f"{m}.weight")
        bound = tol.FLOAT64_REL * np.abs(q_ref).max() * 10  # W_res is ~ W minus its top-r part
        assert np.abs(got.factors[m][0] - A).max() <= bound, (m, "A")
        assert np.abs(got.factors[m][1] - B).max() <= bound, (m, "B")
        diff = np.abs(q_got - q_ref)
        assert diff.max() <= step, (m, "deq(Q(W_res)) moved by more than one step")
        flipped, total = flipped + int((diff > bound).sum()), total + diff.size
    assert flipped <= 1e-4 * total, f"{flipped} of {total} quantised values differ"
