"""OLoRA and MiLoRA (pissa/adapters/inits/olora.py, milora.py) against their real references: PEFT's
init_lora_weights="olora" on the real SmolLM2 matrices, and MiLoRA written here in float64 numpy;
then `pissa init --init olora|milora` end to end through transformers and PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pissa.adapters import inits
from pissa.adapters.inits import decompose, decompose_quantized
from pissa.adapters.spec import AdapterSpec
from pissa.errors import PissaError
from pissa.files.formats.peft import load_adapter
from pissa.jobs.init import ADAPTER_DIR
from pissa.numeric.ops import NumpyOps
from pissa.numeric.quant import scheme
from tests.conformance import tolerances as tol
from tests.conformance.test_inits_conformance import factors_pinned
from tests.conftest import rel_max_diff

R, ALPHA = 8, 16  # alpha != r: s = 2, so a scale put in the wrong place shows


def f64(x):
    return np.asarray(x, dtype=np.float64)


def test_registry_entries():
    assert {"olora", "milora"} <= set(inits.names())
    olora, milora = inits.get("olora"), inits.get("milora")
    assert (olora.RESIDUAL, olora.FULL_SVD, olora.QPISSA) == (True, False, False)
    assert (milora.RESIDUAL, milora.FULL_SVD, milora.QPISSA) == (True, True, False)
    spec = AdapterSpec(rank=R, alpha=ALPHA, init="olora")
    assert spec.peft_init == "olora" and inits.from_peft("olora") == {"init": "olora"}
    assert AdapterSpec.from_peft_config(spec.to_peft_config(initialized=False)).init == "olora"
    # PEFT has no MiLoRA: its config says true, and pissa_config.json's spec keeps the init.
    spec = AdapterSpec(rank=R, alpha=ALPHA, init="milora")
    assert spec.peft_init is True and milora.from_peft(True) is None and milora.from_peft("milora") is None
    assert AdapterSpec.from_peft_config(spec.to_peft_config(), extras=spec.to_dict()).init == "milora"
    # cost(): a QR costs a fraction of PiSSA's full SVD (measured 0.25-0.5, olora.py's COST); MiLoRA the same.
    for shape in [(576, 576), (1536, 576), (576, 1536), (2048, 2048)]:
        full = inits.get("pissa").cost(shape, spec)
        assert 0.2 * full < olora.cost(shape, spec) < 0.6 * full and milora.cost(shape, spec) == full
    W = np.random.default_rng(0).standard_normal((64, 64))
    for init in ("olora", "milora"):
        with pytest.raises(PissaError, match="--quantize needs"):
            decompose_quantized(W, "w", AdapterSpec(rank=4, init=init), NumpyOps(), scheme("int8", 64), 1)


# ---------------------------------------------------------------- OLoRA against PEFT
@pytest.fixture(scope="module")
def peft_olora(smollm2_matrices):
    """PEFT's own OLoRA init of each matrix, through get_peft_model on a module of nn.Linear layers
    holding them: name -> (the base weight PEFT leaves, lora_A, lora_B, scaling), float64."""
    import torch
    from peft import LoraConfig, get_peft_model

    names = list(smollm2_matrices)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleDict()
    for i, W in enumerate(smollm2_matrices.values()):
        linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W))
        holder.layers[f"w{i}"] = linear
    config = LoraConfig(init_lora_weights="olora", r=R, lora_alpha=ALPHA, target_modules=list(holder.layers))
    model = get_peft_model(holder, config)
    out = {}
    for i, name in enumerate(names):
        layer = model.base_model.model.layers[f"w{i}"]
        weights = (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        out[name] = (*(w.detach().double().numpy() for w in weights), layer.scaling["default"])
    return out


def olora_mismatches(W, A, B, residual, peft_result, scale) -> tuple[list[str], dict[str, float]]:
    """What differs between an OLoRA init (A, B, residual, float64) and PEFT's, beyond float32
    rounding of a QR; and the differences relative to max|W|.

    The bounds are derived, not fitted. PEFT's float32 QR is the exact QR of W + E with
    ||E|| <= sqrt(max(m, n)) eps32 sigma_1 (tolerances.backward_error). Q_r spans W's first r
    columns, so it moves by at most sqrt(2) ||E|| / c, c = sigma_min(W[:, :r]) (QR perturbation
    theory: Sun 1991); A = Q_r^T W by ||E|| (1 + sqrt(2) sigma_1 / c); the product s Q_r Q_r^T W
    by s ||E|| (1 + 2 sqrt(2) sigma_1 / c), plus PEFT's float32 product, r eps32 s max(|B| |A|).
    PEFT's signs are LAPACK's; ours are canonical, so PEFT's factors are compared after the same
    rule (each column of B: its largest-magnitude entry positive), done here in numpy."""
    Wd, (Wp, Ap, Bp, sp) = f64(W), peft_result
    top = np.abs(Wd).max()
    S1 = np.linalg.norm(Wd, 2)
    c = np.linalg.svd(Wd[:, : Bp.shape[1]], compute_uv=False)[-1]
    E = tol.backward_error(Wd.shape, S1)
    b_tol = np.sqrt(2) * E / c
    a_tol = E * (1 + np.sqrt(2) * S1 / c)
    product = Bp.shape[1] * tol.EPS32 * scale * (np.abs(Bp) @ np.abs(Ap)).max()
    p_tol = scale * E * (1 + 2 * np.sqrt(2) * S1 / c) + product
    r_tol = p_tol + tol.RECONSTRUCTION_REL * top  # both residuals are also rounded to float32
    # The sign rule must be decided by PEFT's B itself: its top two magnitudes in each column lie
    # further apart than B may move (true of every SmolLM2 matrix here).
    top_two = np.sort(np.abs(Bp), axis=0)[-2:]
    assert (top_two[1] - top_two[0]).min() > 2 * b_tol, "a column's sign rule is undecided within rounding"
    signs = np.sign(Bp[np.argmax(np.abs(Bp), axis=0), np.arange(Bp.shape[1])])
    Bc, Ac = Bp * signs, Ap * signs[:, None]
    diffs, wrong = {}, []
    if A.shape != Ap.shape or B.shape != Bp.shape:
        return [f"shapes A {A.shape} B {B.shape}, PEFT's {Ap.shape} {Bp.shape}"], diffs
    for part, got, want, bound in (("sBA", scale * B @ A, sp * Bp @ Ap, p_tol),
                                   ("residual", residual, Wp, r_tol), ("A", A, Ac, a_tol), ("B", B, Bc, b_tol)):
        diffs[part] = np.abs(got - want).max() / top
        if diffs[part] * top > bound:
            wrong.append(f"{part}: {diffs[part]:.1e} of max|W| > {bound / top:.1e}")
    return wrong, diffs


@pytest.mark.slow
def test_olora_matches_peft_on_smollm2(smollm2_matrices, peft_olora):
    spec = AdapterSpec(rank=R, alpha=ALPHA, init="olora")
    worst, flipped = {}, 0
    for name, W in smollm2_matrices.items():
        f = decompose(W, name, spec, NumpyOps())
        assert f.spectrum is None
        assert peft_olora[name][3] == spec.scale == ALPHA / R
        wrong, diffs = olora_mismatches(W, f64(f.A), f64(f.B), f64(f.residual), peft_olora[name], spec.scale)
        assert not wrong, (name, wrong)
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
        Bp = peft_olora[name][2]
        flipped += int((Bp[np.argmax(np.abs(Bp), axis=0), np.arange(R)] < 0).sum())
        # Canonical signs, orthonormal B, and A = R[:r] upper triangular in its first r columns.
        B, A = f64(f.B), f64(f.A)
        assert (B[np.argmax(np.abs(B), axis=0), np.arange(R)] > 0).all()
        assert np.abs(B.T @ B - np.eye(R)).max() < 1e-6
        assert np.abs(np.tril(A[:, :R], -1)).max() <= 1e-6 * np.abs(W).max()
    print(f"\nOLoRA vs PEFT, max diff / max|W| over {len(smollm2_matrices)} matrices: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f"; {flipped} of PEFT's {R * len(smollm2_matrices)} columns had the other sign")


@pytest.mark.slow
def test_the_peft_comparison_catches_a_wrong_scale_swapped_factors_and_signs(smollm2_matrices, peft_olora):
    """The same check fails for what a slip would give: the factors divided by sqrt(s) as PiSSA's
    split does (s B A = Q_r R_r instead of s Q_r R_r), A and B swapped, one sign pair flipped,
    and PEFT's own (uncanonicalised) factors."""
    spec = AdapterSpec(rank=R, alpha=ALPHA, init="olora")
    name = "model.layers.15.self_attn.q_proj"  # square, so that swapped factors still multiply
    W = smollm2_matrices[name]
    f = decompose(W, name, spec, NumpyOps())
    A, B, s = f64(f.A), f64(f.B), spec.scale

    def check(A, B):
        return olora_mismatches(W, A, B, f64(W) - s * B @ A, peft_olora[name], s)[0]

    assert not check(A, B)
    assert any(w.startswith("sBA") for w in check(A / np.sqrt(s), B / np.sqrt(s)))
    assert any(w.startswith("sBA") for w in check(B.T, A.T))
    flip = np.ones(R)
    flip[3] = -1
    assert [w[0] for w in check(A * flip[:, None], B * flip)] == ["A", "B"]  # B A unchanged
    _, Ap, Bp, _ = peft_olora[name]
    assert [w[0] for w in check(Ap, Bp)] == ["A", "B"]


# ---------------------------------------------------------------- MiLoRA against float64 numpy
def milora_reference(W, r, s):
    """MiLoRA in float64 numpy, from the paper: the last r singular triplets, each U column's
    largest-magnitude entry made positive, A = sqrt(S/s) Vt, B = U sqrt(S/s), W_res = W - s B A.
    Returns (A, B, W_res, all of W's singular values)."""
    U, S_all, Vt = np.linalg.svd(f64(W), full_matrices=False)
    U, S, Vt = U[:, -r:], S_all[-r:], Vt[-r:]
    signs = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(r)])
    U, Vt = U * signs, Vt * signs[:, None]
    root = np.sqrt(S / s)
    A, B = root[:, None] * Vt, U * root
    return A, B, f64(W) - s * B @ A, S_all


@pytest.mark.slow
def test_milora_matches_numpy_float64_on_smollm2(smollm2_matrices):
    spec = AdapterSpec(rank=R, alpha=ALPHA, init="milora")
    worst, skipped = {}, []
    for name, W in smollm2_matrices.items():
        f = decompose(W, name, spec, NumpyOps())
        A, B, W_res, S = milora_reference(W, R, spec.scale)
        top = np.abs(W).max()
        # float32 storage of A, B and W_res against float64: tolerances.FLOAT64_REL.
        diffs = {"sBA": np.abs(spec.scale * (f64(f.B) @ f64(f.A) - B @ A)).max(),
                 "residual": np.abs(f64(f.residual) - W_res).max()}
        if factors_pinned(W, S, "milora", spec):
            diffs.update(A=np.abs(f64(f.A) - A).max(), B=np.abs(f64(f.B) - B).max())
        else:
            skipped.append(name)
        for part, diff in diffs.items():
            assert diff <= tol.FLOAT64_REL * top, (name, part, diff / top)
        worst = {k: max(v / top, worst.get(k, 0.0)) for k, v in diffs.items()}
        rec = f64(f.residual) + spec.scale * f64(f.B) @ f64(f.A)
        assert np.abs(rec - W).max() <= tol.RECONSTRUCTION_REL * top, name
        np.testing.assert_allclose(f.spectrum, S[-R:], rtol=1e-12)  # the r smallest, descending
    print(f"\nMiLoRA vs float64 numpy, max diff / max|W| over {len(smollm2_matrices)} matrices: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f"; factors of {len(skipped)} not pinned at float64: {skipped}")
    assert len(skipped) < len(smollm2_matrices) / 2


# ---------------------------------------------------------------- pissa init, end to end
from tests.conftest import hf_logits  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("init", ["olora", "milora"])
def test_cli_init_loads_in_peft_with_the_original_logits(init, tiny_llama, tmp_path):
    from pissa.cli import main

    out = tmp_path / "out"
    assert main(["init", str(tiny_llama), "--out", str(out), "--init", init, "--rank", "4", "--alpha", "8",
                 "--no-progress"]) == 0
    ids = [[3, 17, 99, 5, 42, 7]]
    before = hf_logits(tiny_llama, ids)
    after = hf_logits(out, ids, adapter=out / ADAPTER_DIR)
    assert rel_max_diff(after, before) < 1e-4
    assert rel_max_diff(hf_logits(out, ids), before) > 1e-3  # the residual alone is another model
    cfg = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert json.loads((out / ADAPTER_DIR / "pissa_config.json").read_text())["spec"]["init"] == init
    assert load_adapter(out / ADAPTER_DIR).spec.init == init
