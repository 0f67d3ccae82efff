"""The projections of docs/scaling.md, from the per-shape timings of scripts/bench_svd_shapes.py:
init time on 1, 8 and 64 ranks (pissa's cost-balanced split against PEFT's ZeRO-3 path, where
every rank repeats every SVD) and training memory per GPU (DDP against FSDP2's shards).

    python scripts/scaling_model.py scaling.json      # prints the markdown tables

Inputs that are not measured here are named constants below, each with its source.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_svd_shapes import MODELS, target_shapes  # noqa: E402

from pissa.dist import assign  # noqa: E402
from pissa.jobs.init_ranks import cost  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402

RANKS = (1, 8, 64)
RANK, SEQ, MICRO = 16, 2048, 1           # adapter rank; tokens per sequence, sequences per rank and micro-batch
# The PiSSA paper (Appendix B): exact SVD of a 7B model's self-attention matrices (32 x 4 of
# 4096 x 4096) took about 435 s on its GPU, so 3.4 s per matrix. The one GPU figure this model has.
PAPER_GPU_FULL_4096 = 435 / 128
DISK_GB_S = 2.0                          # assumed read+write bandwidth per machine (NVMe); not measured
GPU_MEM = {"H100 80 GB": 80e9, "H200 141 GB": 141e9}


def params(model: str) -> tuple[int, int]:
    """(all parameters, adapter parameters at RANK on all seven linear kinds)."""
    return params_of(MODELS[model], qkv_bias=model.startswith("Qwen"))


def shapes_of(dims: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """[out, in] of the seven target kinds of one block, for dims (hidden, inter, layers, heads,
    kv heads, head dim, vocab)."""
    hidden, inter, _, heads, kv, hd, _ = dims
    return {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
            "o_proj": (hidden, heads * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def params_of(dims: tuple[int, ...], qkv_bias: bool = False) -> tuple[int, int]:
    hidden, inter, layers, heads, kv, hd, vocab = dims
    shapes = shapes_of(dims).values()
    block = sum(m * n for m, n in shapes) + 2 * hidden
    if qkv_bias:
        block += heads * hd + 2 * kv * hd    # q, k, v biases
    total = 2 * vocab * hidden + layers * block + hidden  # untied embeddings and head
    return total, layers * sum(RANK * (m + n) for m, n in shapes)


def steps(model: str) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is a target) of every tensor, in file order."""
    hidden, _, layers, _, _, _, vocab = MODELS[model]
    out = [("model.embed_tokens.weight", (vocab, hidden), False)]
    for i in range(layers):
        out += [(f"model.layers.{i}.{('self_attn.' if k.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp.')}"
                 f"{k}.weight", s, True) for k, s in target_shapes(model).items()]
        out += [(f"model.layers.{i}.input_layernorm.weight", (hidden,), False),
                (f"model.layers.{i}.post_attention_layernorm.weight", (hidden,), False)]
    return out + [("model.norm.weight", (hidden,), False), ("lm_head.weight", (vocab, hidden), False)]


def seconds(bench: dict, method: str, dtype: str, shape: tuple[int, ...], target: bool) -> float:
    """Measured (or, for the largest full SVDs, extrapolated) time of one tensor on one core."""
    copy = bench["copy_s_per_element"] * int(np.prod(shape))
    if not target:
        return copy
    key = f"{dtype} {shape[0]}x{shape[1]}"
    t = bench["fast"][key] if method == "pissa-fast" else bench["full"][key]["seconds"]
    return t + copy


def init_table(bench: dict, method: str, dtype: str) -> list[str]:
    rows = [f"| model | matrices | 1 rank | {' | '.join(f'{n} ranks (ideal)' for n in RANKS[1:])} | PEFT ZeRO-3, any N |",
            "| --- | --- | --- | " + " | ".join("---" for _ in RANKS[1:]) + " | --- |"]
    spec = AdapterSpec(rank=RANK, init=method, compute_dtype=dtype)
    for model in MODELS:
        tensors = steps(model)
        job = SimpleNamespace(shapes={n: s for n, s, _ in tensors}, targets={n[:-7] for n, _, t in tensors if t},
                              spec=spec, quantize=None, quant_iters=1)
        costs = [cost(job, [n]) for n, _, _ in tensors]
        times = [seconds(bench, method, dtype, s, t) for _, s, t in tensors]
        total = sum(times)
        svd_only = sum(t for t, (_, _, target) in zip(times, tensors) if target)
        cells = [_hours(total)]
        for n in RANKS[1:]:
            owner = np.array(assign(costs, n))
            makespan = max(sum(t for t, o in zip(times, owner) if o == r) for r in range(n))
            cells.append(f"{_hours(makespan)} ({_hours(total / n)})")
        rows.append(f"| {model} | {len(job.targets)} | {' | '.join(cells)} | {_hours(svd_only)} + gathers |")
    return rows


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def memory(model: str, ranks: int, shard: bool, base_bytes: int = 4) -> float:
    """Bytes per GPU while training one of MODELS (memory_of)."""
    return memory_of(MODELS[model], ranks=ranks, shard=shard, base_bytes=base_bytes,
                     qkv_bias=model.startswith("Qwen"))


def memory_of(dims: tuple[int, ...], seq: int = SEQ, micro: int = MICRO, ranks: int = 1, shard: bool = False,
              base_bytes: int = 4, qkv_bias: bool = False) -> float:
    """Bytes per device while training: the frozen base (base_bytes per parameter: 4 under fp32
    precision, 2 under bf16, where pissa loads the frozen weights in bf16), the adapter with its
    gradient and AdamW's two moments in float32 (16 bytes per parameter), and activations with
    --grad-checkpointing (every block's bf16 input, one block's full activations by Korthikanti et
    al. 2022, 34 s h + 5 a s^2 bytes per sequence, and the logits: bf16, their float32 copy and
    its gradient, 10 bytes per entry). FSDP2 divides the first two by the ranks and adds two
    blocks gathered whole (one computing, one prefetched). dims: (hidden, inter, layers, heads,
    kv heads, head dim, vocab)."""
    hidden, inter, layers, heads, kv, hd, vocab = dims
    total, adapter = params_of(dims, qkv_bias)
    block = sum(m * n for m, n in shapes_of(dims).values())
    weights, state = base_bytes * total, 16 * adapter
    acts = micro * (layers * seq * hidden * 2 + seq * (34 * hidden + 5 * heads * seq) + 10 * seq * vocab)
    if shard and ranks > 1:
        return (weights + state) / ranks + 2 * base_bytes * block + acts
    return weights + state + acts


def memory_table() -> list[str]:
    rows = ["| model | parameters | adapter (r 16) | DDP, any N (fp32) | FSDP2 8 GPUs (fp32) | FSDP2 64 GPUs (fp32) "
            "| DDP, bf16 (CUDA's default) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in MODELS:
        total, adapter = params(model)
        cells = [memory(model, 1, False), memory(model, 8, True), memory(model, 64, True),
                 memory(model, 1, False, base_bytes=2)]
        rows.append(f"| {model} | {total / 1e9:.2f} B | {adapter / 1e6:.1f} M | "
                    + " | ".join(f"{c / 2**30:.0f} GiB{_fits(c)}" for c in cells) + " |")
    return rows


def _fits(b: float) -> str:
    fits = [name for name, cap in GPU_MEM.items() if b < 0.9 * cap]  # 10% for CUDA context, NCCL, fragments
    return "" if len(fits) == len(GPU_MEM) else f" ({'H200 only' if fits else 'fits neither'})"


def main() -> None:
    bench = json.load(open(sys.argv[1]))
    print(f"load average while measuring: start {bench['load_start']}, end {bench['load_end']}\n")
    for method, dtype in (("pissa", "float64"), ("pissa", "float32"), ("pissa-fast", "float32"),
                          ("pissa-fast", "float64")):
        print(f"### init {method}, compute {dtype}: one CPU core per rank, compute only\n")
        print("\n".join(init_table(bench, method, dtype)) + "\n")
    gpu = bench["full"]["float32 4096x4096"]["seconds"] / PAPER_GPU_FULL_4096
    print(f"GPU speed-up for a float32 full SVD, this core -> the paper's GPU: {gpu:.0f}x\n")
    for model in MODELS:
        total, _ = params(model)
        print(f"{model}: {total * 2 / 1e9:.0f} GB in bf16; reading it and writing a float32 residual at "
              f"{DISK_GB_S:g} GB/s: {_hours(total * 6 / DISK_GB_S / 1e9)} per machine")
    print("\n### training memory per GPU (SEQ 2048, 1 sequence per rank, --grad-checkpointing)\n")
    print("\n".join(memory_table()))


if __name__ == "__main__":
    main()
