"""`pissa init` end to end: folders that transformers, PEFT and mlx-lm load, with the original logits."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from pissa.files.formats.peft import load_adapter
from pissa.files.formats.safetensors import SafetensorsFile
from pissa.jobs.init import ADAPTER_DIR, run_init
from pissa.adapters.spec import AdapterSpec
from tests.conftest import PROMPT_IDS, hf_logits, rel_max_diff, write_tiny_llama


def test_tiny_model_round_trip_through_transformers_and_peft(tiny_llama, tmp_path):
    out = tmp_path / "out"
    summary = run_init(str(tiny_llama), out, AdapterSpec(rank=8), progress=False)
    assert summary.matrices == 14
    ids = [[3, 17, 99, 5, 42, 7]]
    before = hf_logits(tiny_llama, ids)
    residual_only = hf_logits(out, ids)
    after = hf_logits(out, ids, adapter=out / ADAPTER_DIR)
    assert rel_max_diff(after, before) < 1e-4
    assert rel_max_diff(residual_only, before) > 1e-2  # the adapter really carries the principal part
    cfg = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["target_modules"] == "all-linear"
    assert SafetensorsFile(out / ADAPTER_DIR / "adapter_model.safetensors").metadata == {"format": "pt"}
    assert load_adapter(out / ADAPTER_DIR).info["role"] == "pissa_init"


def test_sharded_model_and_bfloat16_storage(tmp_path):
    src = write_tiny_llama(tmp_path / "src", max_shard_bytes=60_000)
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    run_init(str(src), out, AdapterSpec(rank=4, dtype="bfloat16", targets=("q_proj", "v_proj")),
             progress=False, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    adapter = load_adapter(out / ADAPTER_DIR)
    assert sorted(adapter.factors) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(a.dtype.name == "bfloat16" for a, _ in adapter.factors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _peak_bytes(tmp_path, layers: int) -> tuple[int, int]:
    src = write_tiny_llama(tmp_path / f"src{layers}", layers=layers, hidden=128, inter=384,
                           max_shard_bytes=400_000)
    model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    tracemalloc.start()
    run_init(str(src), tmp_path / f"out{layers}", AdapterSpec(rank=8), progress=False, max_shard_bytes=400_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, model_bytes


def test_peak_memory_follows_the_largest_matrix_not_the_model(tmp_path):
    """tracemalloc sees numpy's buffers; memory-mapped reads are not allocations."""
    peak2, size2 = _peak_bytes(tmp_path, 2)
    peak8, size8 = _peak_bytes(tmp_path, 8)
    largest = 384 * 128 * 8  # one float64 copy of the largest matrix
    assert size8 > 3.5 * size2
    # Peak is a few copies of the largest matrix (float64 work arrays, SVD factors) plus the
    # adapter, which grows with the model but is r/(in+out) of it.
    assert peak8 < size8 / 2, (peak8, size8)
    assert peak8 < peak2 * 1.5, (peak2, peak8)
    assert peak8 < 16 * largest, (peak8, largest)


def test_failure_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import pissa.adapters.inits

    calls = {"n": 0}
    real = pissa.adapters.inits.decompose_many

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(pissa.adapters.inits, "decompose_many", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_init(str(tiny_llama), out, AdapterSpec(rank=4), progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_force_replaces_a_non_empty_folder(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    run_init(str(tiny_llama), out, AdapterSpec(rank=4), progress=False, force=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]


# ---------------------------------------------------------------- the real SmolLM2 weights
@pytest.fixture(scope="session")
def smollm2_init(tmp_path_factory):
    """`pissa init smollm2-135m --backend numpy` with the defaults (full SVD, float64 compute)."""
    out = tmp_path_factory.mktemp("smollm2") / "pissa"
    summary = run_init("smollm2-135m", out, AdapterSpec(), progress=False)
    return out, summary


@pytest.mark.slow
def test_smollm2_init_gives_the_original_logits_in_transformers_and_peft(smollm2_init, hf_smollm2):
    import torch

    out, summary = smollm2_init
    assert summary.matrices == 210
    # per layer: q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536
    assert summary.trainable == 30 * 16 * (2 * (576 + 576) + 2 * (192 + 576) + 3 * (1536 + 576))
    with torch.no_grad():
        want = hf_smollm2(torch.tensor(PROMPT_IDS[:1])).logits.numpy()
    got = hf_logits(out, PROMPT_IDS[:1], adapter=out / ADAPTER_DIR)
    assert rel_max_diff(got, want) < 1e-4


@pytest.mark.slow
def test_smollm2_residual_folder_gives_the_same_logits_in_transformers_and_mlx_lm(smollm2_init):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    out, _ = smollm2_init
    want = hf_logits(out, PROMPT_IDS[:1])
    model, _ = load(str(out))
    got = np.array(model(mx.array(PROMPT_IDS[:1])).astype(mx.float32))
    assert rel_max_diff(got, want) < 1e-4


@pytest.mark.slow
def test_smollm2_tokenizer_and_generation_config_are_written(smollm2_init):
    from transformers import AutoTokenizer

    out, _ = smollm2_init
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert "What is the capital of France?" in text and "assistant" in text
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_batched_svd_gives_the_same_files(tiny_llama, tmp_path):
    """Stacking same-shape targets into one SVD call changes the order of work, not the result."""
    from pissa.files.formats.safetensors import load

    spec = AdapterSpec(rank=4, init="pissa-fast")
    run_init(str(tiny_llama), tmp_path / "one", spec, progress=False, svd_batch=1)
    run_init(str(tiny_llama), tmp_path / "four", spec, progress=False, svd_batch=4)
    for rel in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        a, b = load(tmp_path / "one" / rel), load(tmp_path / "four" / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max() <= 1e-6, k


def test_init_memory_follows_what_it_computes_not_the_largest_tensor(tmp_path):
    """A sharded checkpoint with a large embedding: pissa init reads what passes through (the
    embedding, and every target of LoRA's init) from the input's memory map and writes it in
    chunks, so the process's own (anonymous) memory never holds a whole copy of it. It used to
    peak at 3.6x the largest tensor; measured on scripts/bench_memory.py's 1.2B model, 4.3x."""
    from pissa.memory import AnonPeak, anon_mib
    from pissa.jobs.init import run_init

    if anon_mib() is None:
        pytest.skip("the OS does not report anonymous memory")
    from pissa.files.formats import hf
    from pissa.numeric.dtypes import np_dtype
    from tests.conftest import tiny_llama_config

    src, bf16 = tmp_path / "src", np_dtype("bfloat16")
    src.mkdir()
    cfg = tiny_llama_config(layers=1, hidden=1024, inter=256, vocab=32768)
    shapes = {"model.embed_tokens.weight": (32768, 1024), **{f"model.layers.0.{k}.weight": s for k, s in (
        ("self_attn.q_proj", (1024, 1024)), ("self_attn.k_proj", (512, 1024)), ("self_attn.v_proj", (512, 1024)),
        ("self_attn.o_proj", (1024, 1024)), ("mlp.gate_proj", (256, 1024)), ("mlp.up_proj", (256, 1024)),
        ("mlp.down_proj", (1024, 256)), ("input_layernorm", (1024,)), ("post_attention_layernorm", (1024,)))},
        "model.norm.weight": (1024,), "lm_head.weight": (32768, 1024)}
    writer = hf.ModelWriter(src, [(n, bf16, s) for n, s in shapes.items()], max_shard_bytes=40 * 2**20)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.write(name, (rng.standard_normal(shape, np.float32) * 0.02).astype(bf16))
    writer.close()
    (src / "config.json").write_text(json.dumps(hf.model_config(cfg, "bfloat16")))
    largest = 32768 * 1024 * 2 / 2**20  # MiB: the embedding (and the head) in bfloat16
    assert len(list(src.glob("*.safetensors"))) > 1
    for dtype, bound in ((None, 0.25), ("float32", 0.5)):  # a bf16 copy, and a cast chunk by chunk
        base = anon_mib()
        with AnonPeak(0.002) as peak:
            run_init(str(src), tmp_path / f"out-{dtype}", AdapterSpec(rank=4, init="lora", dtype=dtype), progress=False)
        print(f"dtype {dtype}: anonymous memory grew {peak.mib - base:.0f} MiB, largest tensor {largest:.0f} MiB")
        assert peak.mib - base < bound * largest
