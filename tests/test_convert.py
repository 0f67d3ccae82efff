"""PiSSA -> LoRA conversion as pure math (the identity in pissa/adapters/kinds/lora.py's docstring), in
float64 numpy."""

import numpy as np
import pytest

from pissa.jobs.convert import pissa_to_lora
from pissa.adapters.inits import decompose
from pissa.errors import PissaError
from pissa.adapters.adapter import Adapter
from pissa.numeric.ops import NumpyOps
from pissa.adapters.spec import AdapterSpec


def f64(x):
    return np.asarray(x, dtype=np.float64)


@pytest.mark.parametrize("alpha, rslora", [(None, False), (32.0, False), (16.0, True)])
def test_converted_lora_on_the_original_weights_equals_the_trained_model(alpha, rslora):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((48, 80)).astype(np.float32)
    spec = AdapterSpec(rank=6, alpha=alpha, use_rslora=rslora)
    f = decompose(W, "m", spec, NumpyOps())
    initial = Adapter(spec, {"m": (f.A, f.B)}, info={"role": "pissa_init", "fingerprint": "abc"})
    A1 = f.A + 0.1 * rng.standard_normal(f.A.shape).astype(np.float32)
    B1 = f.B + 0.1 * rng.standard_normal(f.B.shape).astype(np.float32)
    trained = Adapter(spec, {"m": (A1, B1)}, info={"role": "trained", "init_fingerprint": "abc"})
    lora = pissa_to_lora(initial, trained)
    La, Lb = lora.factors["m"]
    assert La.shape == (12, 80) and Lb.shape == (48, 12)
    assert lora.spec.rank == 12 and lora.spec.scale == pytest.approx(spec.scale, rel=1e-12)
    pissa_model = f64(f.residual) + spec.scale * f64(B1) @ f64(A1)
    lora_model = f64(W) + lora.spec.scale * f64(Lb) @ f64(La)
    assert np.abs(pissa_model - lora_model).max() <= 1e-6 * np.abs(W).max()


def test_conversion_checks_that_the_runs_match():
    spec = AdapterSpec(rank=2)
    A, B = np.ones((2, 4), np.float32), np.ones((3, 2), np.float32)
    init = Adapter(spec, {"m": (A, B)}, info={"role": "pissa_init", "fingerprint": "abc"})
    with pytest.raises(PissaError, match="different init"):
        pissa_to_lora(init, Adapter(spec, {"m": (A, B)}, info={"init_fingerprint": "xyz"}))
    with pytest.raises(PissaError, match="adapt different modules"):
        pissa_to_lora(init, Adapter(spec, {"n": (A, B)}, info={"init_fingerprint": "abc"}))
    with pytest.raises(PissaError, match="rank 2 and scale 1 but --trained has rank 4"):
        pissa_to_lora(init, Adapter(AdapterSpec(rank=4), {"m": (A, B)}, info={"init_fingerprint": "abc"}))
    with pytest.raises(PissaError, match="is a trained adapter; pass the pissa_init folder"):
        pissa_to_lora(Adapter(spec, {"m": (A, B)}, info={"role": "trained"}), init)
