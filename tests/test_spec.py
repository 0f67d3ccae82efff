import dataclasses

import pytest

from pissa.errors import PissaError
from pissa.adapters.spec import AdapterSpec, parse_targets


def test_defaults_and_scale():
    s = AdapterSpec()
    assert (s.rank, s.alpha, s.init, s.compute_dtype, s.dtype) == (16, 16.0, "pissa", "float64", "float32")
    assert s.scale == 1.0
    assert AdapterSpec(rank=16, alpha=32).scale == 2.0
    assert AdapterSpec(rank=16, alpha=32, use_rslora=True).scale == pytest.approx(8.0)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AdapterSpec().rank = 3


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "rank must be >= 1"),
    ({"rank": -2}, "rank must be >= 1"),
    ({"rank": 2.5}, "rank must be an integer"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"init": "bogus"}, "unknown init 'bogus'; choose one of pissa, pissa-fast, lora"),
    ({"kind": "bogus"}, "unknown adapter kind 'bogus'; choose one of lora"),
    ({"kind": "mora", "init": "pissa"}, "--init pissa is for the LoRA-shaped kinds .*; --kind mora has no init"),
    ({"kind": "full", "init": "mora"}, "--init mora is --kind mora, which conflicts with --kind full"),
    ({"options": {"mora_type": "sharing"}}, "--kind lora takes no option mora_type; it has no options"),
    ({"kind": "mora", "options": {"mora_type": "diagonal"}}, "unknown mora type 'diagonal'; choose sharing or rotation"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ({"niter": -1}, "niter must be >= 0"),
    ({"dtype": "int8"}, "unknown storage dtype"),
    ({"compute_dtype": "float16"}, "unknown compute dtype"),
    ({"targets": "("}, "not a valid regular expression"),
    ({"targets": []}, "empty"),
])
def test_invalid_values_are_named(kwargs, words):
    with pytest.raises(PissaError, match=words):
        AdapterSpec(**kwargs)


def test_unknown_keys_rejected():
    with pytest.raises(PissaError, match=r"unknown adapter spec key\(s\) \['rnak'\]"):
        AdapterSpec.from_dict({"rnak": 4})


def test_target_matching_follows_peft():
    names = AdapterSpec(targets=("q_proj", "v_proj"))
    assert names.matches("model.layers.0.self_attn.q_proj")
    assert not names.matches("model.layers.0.self_attn.qq_proj")
    regex = AdapterSpec(targets=r".*\.0\.self_attn\.(q|k)_proj")
    assert regex.matches("model.layers.0.self_attn.k_proj")
    assert not regex.matches("model.layers.10.self_attn.k_proj")
    all_linear = AdapterSpec()
    assert all_linear.matches("model.layers.3.mlp.down_proj")
    assert not all_linear.matches("lm_head") and not all_linear.matches("model.embed_tokens")
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_targets(r".*q_proj") == r".*q_proj"


def test_resolve_errors():
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 32), "model.norm.weight": (32,)}
    assert AdapterSpec(rank=8).resolve(shapes) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(PissaError, match=r"rank 9 exceeds min\(out, in\)"):
        AdapterSpec(rank=9).resolve(shapes)
    with pytest.raises(PissaError, match="match no linear layer"):
        AdapterSpec(rank=2, targets=("nothing",)).resolve(shapes)


@pytest.mark.parametrize("spec", [
    AdapterSpec(),
    AdapterSpec(rank=8, alpha=16, use_rslora=True, targets=("q_proj", "v_proj"), init="pissa-fast", niter=2),
    AdapterSpec(rank=4, targets=r".*attn.*", init="lora"),
])
def test_peft_round_trip_is_lossless(spec):
    before = spec.to_peft_config(initialized=False)
    back = AdapterSpec.from_peft_config(before, extras={k: getattr(spec, k) for k in
                                                        ("oversampling", "seed", "dtype", "compute_dtype")})
    assert back == spec
    # Once initialised, PEFT must load weights instead of running the SVD again.
    assert spec.to_peft_config()["init_lora_weights"] is True


def test_peft_config_is_what_peft_writes():
    """Our written config has exactly PEFT's keys, and PEFT parses it back to the same values."""
    peft = pytest.importorskip("peft")
    ours = AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")).to_peft_config(initialized=False)
    theirs = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             init_lora_weights="pissa").to_dict()
    theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.items()}
    theirs["target_modules"] = sorted(theirs["target_modules"])
    theirs.pop("peft_version")
    ours.pop("peft_version")
    assert ours == theirs
    parsed = peft.LoraConfig(**{k: v for k, v in ours.items() if k not in ("peft_type",)})
    assert (parsed.r, parsed.lora_alpha, parsed.init_lora_weights) == (8, 16, "pissa")


def test_peft_unknown_and_unsupported_keys():
    cfg = AdapterSpec().to_peft_config()
    with pytest.raises(PissaError, match="unknown key"):
        AdapterSpec.from_peft_config({**cfg, "lora_rank": 3})
    with pytest.raises(PissaError, match="lora_bias"):
        AdapterSpec.from_peft_config({**cfg, "lora_bias": True})
    with pytest.raises(PissaError, match="init_lora_weights 'corda' is not supported"):
        AdapterSpec.from_peft_config({**cfg, "init_lora_weights": "corda"})


def test_kind_and_init_are_two_axes():
    """--kind says what the layer computes, --init how a LoRA-shaped one starts; the kinds without
    an init take the old --init names as aliases, and their options are the kind's."""
    assert (AdapterSpec().kind, AdapterSpec().init) == ("lora", "pissa")
    mora = AdapterSpec(init="mora", options={"mora_type": "rotation"})
    assert (mora.kind, mora.init, mora.option("mora_type")) == ("mora", None, "rotation")
    assert mora == AdapterSpec(kind="mora", options={"mora_type": "rotation"})
    assert AdapterSpec(kind="mora").option("mora_type") == "sharing"
    assert (AdapterSpec(kind="full").kind, AdapterSpec(kind="full").init) == ("full", None)
    assert AdapterSpec(kind="mora").describe() == "mora (sharing)" and AdapterSpec(init="lora").describe() == "lora"
    for spec in (mora, AdapterSpec(kind="full"), AdapterSpec(init="pissa-fast", dropout=0.1)):
        assert AdapterSpec.from_dict(spec.to_dict()) == spec


def test_specs_written_before_the_two_axes_still_read():
    """pissa_config.json "spec" as pissa wrote it before --kind existed (tests/fixtures/legacy has
    whole folders): no "kind", MoRA's type at the top level, the kind named by "init"."""
    old = {"alpha": 2.0, "compute_dtype": "float64", "dtype": "float32", "niter": 4, "oversampling": 8, "rank": 2,
           "seed": 0, "targets": "all-linear", "use_rslora": False}
    assert AdapterSpec.from_dict({**old, "init": "mora", "mora_type": "rotation"}) == AdapterSpec(
        rank=2, kind="mora", options={"mora_type": "rotation"})
    assert AdapterSpec.from_dict({**old, "init": "full"}) == AdapterSpec(rank=2, kind="full")
    assert AdapterSpec.from_dict({**old, "init": "pissa-fast"}) == AdapterSpec(rank=2, init="pissa-fast")


def test_dropout_is_peft_lora_dropout():
    cfg = AdapterSpec(dropout=0.05).to_peft_config()
    assert cfg["lora_dropout"] == 0.05
    assert AdapterSpec.from_peft_config({**cfg, "lora_dropout": 0.1}).dropout == 0.1
