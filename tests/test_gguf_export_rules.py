"""The rules of pissa's GGUF writing one at a time (tests/test_gguf_export.py checks whole files):
llama.cpp's row permutation, tensor types and scale, vLLM's ranks, and what is refused: one line,
exit 2, nothing written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pissa.cli import main
from pissa.files.formats.gguf_write import permute_rows, tensor_type
from pissa.files.loaders.gguf import unpermute_rows
from tests.test_gguf_export import EPS32, fields, llama_cpp_delta, perturbed, raw, run
from tests.test_loaders import llama_cpp_permute


def test_permute_rows_is_what_the_reader_undoes():
    w = np.random.default_rng(0).standard_normal((96, 5))
    np.testing.assert_array_equal(permute_rows(w, 3), llama_cpp_permute(w, 3))
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 6), 6), w)


def test_tensor_types_follow_the_converter():
    from gguf import GGMLQuantizationType as Q

    assert tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == Q.F32
    assert tensor_type("blk.0.attn_q.bias", (64,), "f16") == Q.F32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "bf16") == Q.BF16
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q8_0") == Q.Q8_0
    assert tensor_type("blk.0.attn_q.weight.lora_b", (64, 8), "q8_0") == Q.F16  # rows of 8: no whole Q8_0 block


def test_rslora_scale_is_folded_into_the_factors(tmp_path):
    from pissa import AdapterSpec
    from pissa.adapters.adapter import Adapter
    from pissa.files.formats.gguf_lora import save_lora_gguf
    from tests.conftest import tiny_llama_config

    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    spec = AdapterSpec(rank=4, alpha=8, use_rslora=True, init="lora")
    save_lora_gguf(tmp_path / "r.gguf", Adapter(spec, {"model.layers.0.self_attn.o_proj": (A, B)}), tiny_llama_config())
    lora, alpha = raw(tmp_path / "r.gguf"), fields(tmp_path / "r.gguf")["adapter.lora.alpha"]
    want = spec.scale * (B.astype(np.float64) @ A.astype(np.float64))  # alpha / sqrt(r), not llama.cpp's alpha / r
    got = llama_cpp_delta(lora, alpha, "blk.0.attn_output.weight")
    # Each factor took sqrt(s r / alpha) in float64 and one float32 rounding: the product moves by at
    # most 2 roundings of |B| |A| (first order).
    bound = 2.0001 * EPS32 / 2 * spec.scale * (np.abs(B).astype(np.float64) @ np.abs(A).astype(np.float64))
    assert alpha == 8 and (np.abs(got - want) <= bound).all()


@pytest.mark.parametrize("rank, want", [(1, 1), (2, 8), (8, 8), (9, 16), (32, 32), (300, 320), (321, 512),
                                        (512, 512), (513, None)])
def test_vllm_max_lora_rank(rank, want):
    from pissa.jobs.convert import vllm_rank

    assert vllm_rank(rank) == want


# --- what is refused, one line each, nothing written -----------------------------------------------

def refused(capsys, where: Path, *argv: str) -> str:
    before = sorted(where.iterdir()) if where.is_dir() else []
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pissa: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert (sorted(where.iterdir()) if where.is_dir() else []) == before  # nothing written, no temporary left
    return err


def test_dora_and_rotation_mora_are_refused_for_llama_cpp_and_vllm(tiny_llama, tmp_path, capsys):
    for kind, extra in (("dora", ()), ("mora", ("--mora-type", "rotation"))):
        init = tmp_path / kind
        assert run("init", str(tiny_llama), "--out", str(init), "--rank", "4", "--kind", kind, *extra,
                   "--no-progress") == 0
        capsys.readouterr()
        adapter = ("--initial", str(init / "pissa_init"), "--trained", str(init / "pissa_init"))
        for out in ("lora.gguf", "lora"):
            err = refused(capsys, tmp_path, "convert", *adapter, "--out", str(tmp_path / out))
            assert "vLLM and llama.cpp serve plain LoRA adapters only" in err and "pissa merge" in err
        err = refused(capsys, tmp_path, "convert", "--trained", str(init / "pissa_init"), "--base", "residual",
                      "--model", str(tiny_llama), "--out", str(tmp_path / "r.gguf"))
        assert f"llama.cpp's LoRA files hold plain LoRA adapters, not {kind}" in err


def test_architectures_and_configs_gguf_cannot_hold(tiny_llama, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    capsys.readouterr()
    err = refused(capsys, tmp_path, "merge", str(tmp_path / "gpt2"), "--out", str(tmp_path / "g.gguf"))
    assert "not model_type 'gpt2'" in err and "convert_hf_to_gguf.py" in err
    config = json.loads((tiny_llama / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (tiny_llama / "config.json").write_text(json.dumps(config))
    err = refused(capsys, tmp_path, "merge", str(tiny_llama), "--out", str(tmp_path / "l.gguf"))
    assert "'llama3' rope scaling" in err


def test_cli_options_and_existing_outputs(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "init"
    assert run("init", str(tiny_llama), "--out", str(model_dir), "--rank", "4", "--no-progress") == 0
    init, trained = str(model_dir), str(perturbed(model_dir / "pissa_init", tmp_path / "trained"))
    assert "--dtype is for a Hugging Face folder" in refused(
        capsys, tmp_path, "merge", init, "--adapter", trained, "--out", str(tmp_path / "m.gguf"), "--dtype", "float16")
    assert "--gguf-type is for a .gguf output" in refused(
        capsys, tmp_path, "merge", init, "--adapter", trained, "--out", str(tmp_path / "m"), "--gguf-type", "f16")
    assert "unknown --gguf-type 'q4_k'" in refused(
        capsys, tmp_path, "merge", init, "--adapter", trained, "--out", str(tmp_path / "m.gguf"), "--gguf-type", "q4_k")
    out = tmp_path / "lora.gguf"
    out.write_bytes(b"keep")
    lora = ("convert", "--initial", str(model_dir / "pissa_init"), "--trained", trained, "--out", str(out))
    assert "exists; choose another file or pass --force" in refused(capsys, tmp_path, *lora)
    assert out.read_bytes() == b"keep"
    assert main([*lora, "--force"]) == 0 and out.read_bytes()[:4] == b"GGUF"
    assert "--gguf-type, --model and --base are options of --format gguf" in refused(
        capsys, tmp_path, *lora[:-1], str(tmp_path / "peft"), "--gguf-type", "f16")
    capsys.readouterr()
    assert main([*lora[:-1], str(tmp_path / "peft")]) == 0
    assert re.search(r"vLLM: .*--enable-lora .*--max-lora-rank 8$", capsys.readouterr().out.strip())


def test_modules_llama_cpp_has_no_place_for(tmp_path):
    from pissa import AdapterSpec
    from pissa.adapters.adapter import Adapter
    from pissa.errors import PissaError
    from pissa.files.formats.gguf_lora import save_lora_gguf
    from tests.conftest import tiny_llama_config

    config = {**tiny_llama_config(), "tie_word_embeddings": True}
    lm_head = (np.zeros((4, 64), np.float32), np.zeros((128, 4), np.float32))
    with pytest.raises(PissaError, match="1 adapted module.*lm_head.*merge instead"):
        save_lora_gguf(tmp_path / "x.gguf", Adapter(AdapterSpec(rank=4, init="lora"), {"lm_head": lm_head}), config)
    assert not any(tmp_path.iterdir())
