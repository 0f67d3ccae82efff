"""The weight-change rank of pissa compare's report (pissa.studies.spectrum), against float64 numpy."""

from __future__ import annotations

import numpy as np

from pissa.adapters.adapter import Adapter
from pissa.files.formats.peft import save_adapter
from pissa.jobs.init import run_init
from pissa.adapters.spec import AdapterSpec
from pissa.studies.spectrum import module_type, rank_for, weight_change_ranks


def test_rank_for_counts_the_variance():
    s = np.array([3.0, 2.0, 1.0, 0.0])           # energies 9, 4, 1: 64%, 93%, 100%
    assert rank_for(s, 0.9) == 2 and rank_for(s, 0.5) == 1 and rank_for(s, 0.95) == 3
    assert rank_for(np.zeros(3)) == 0
    assert rank_for(np.ones(10), 0.9) == 9         # equal values: 9 of 10 explain exactly 90%
    assert module_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"


def test_weight_change_ranks_of_a_lora_and_of_a_full_update(tiny_llama, tmp_path):
    """A rank-3 LoRA update has rank 3 at most; a dense random update has nearly full rank."""
    lora_init = tmp_path / "lora"
    run_init(str(tiny_llama), lora_init, AdapterSpec(rank=3, init="lora"), progress=False)
    full_init = tmp_path / "full"
    run_init(str(tiny_llama), full_init, AdapterSpec(kind="full"), progress=False)
    from pissa.files.formats.peft import load_adapter
    from pissa.files.loaders import open_model

    rng = np.random.default_rng(0)
    start = load_adapter(lora_init / "pissa_init")
    trained = Adapter(start.spec, {m: (A, rng.standard_normal(B.shape).astype(np.float32))
                                   for m, (A, B) in start.factors.items()})
    (tmp_path / "lora-trained").mkdir()
    save_adapter(tmp_path / "lora-trained", trained)
    ranks = weight_change_ranks(full_init, lora_init, tmp_path / "lora-trained")
    assert set(ranks) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert all(1 <= r["max"] <= 3 and r["layers"] == 2 for r in ranks.values())
    base = open_model(str(tiny_llama))
    full = Adapter(AdapterSpec(kind="full"), {m: (base.get(m + ".weight") + rng.standard_normal(
        base.shapes()[m + ".weight"]).astype(np.float32),) for m in start.factors})
    (tmp_path / "full-trained").mkdir()
    save_adapter(tmp_path / "full-trained", full)
    ranks = weight_change_ranks(full_init, full_init, tmp_path / "full-trained")
    q = ranks["self_attn.q_proj"]                  # a 64 x 64 Gaussian: 90% of its energy needs most of it
    want = rank_for(np.linalg.svd(full.factors["model.layers.0.self_attn.q_proj"][0]
                                  - base.get("model.layers.0.self_attn.q_proj.weight"), compute_uv=False))
    assert q["min"] <= want <= q["max"] and want > 30
