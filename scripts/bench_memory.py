"""Peak memory of a 1B-class model stored in bf16, measured rather than modelled: `pissa init`, a
training step in fp32 and in bf16 precision and `pissa eval` on both backends, and QPiSSA's step-0
KL against its init. The model is a random Llama of about 1.2B parameters (hidden 2048, 8192
intermediate, 16 blocks, SmolLM2's 49k vocabulary and tokenizer, untied head) that this script
writes in bf16, in 1 GiB shards; nothing is downloaded.

    python scripts/bench_memory.py [--work DIR] [--parts init,train,eval,kl] [--backends torch,mlx]
                                   [--seq 256] [--steps 2] [--keep]

Each measurement runs in a child process of its own, so that each peak is its alone. Two peaks
per row: the resident set (ru_maxrss, which counts the pages of memory-mapped weight files the
kernel can drop) and the anonymous memory (RssAnon, sampled every 5 ms: what the process itself
holds). Training rows also show the scaling model's prediction for the same shapes and sequence
(scripts/scaling_model.py memory(), whose terms docs/scaling.md explains) beside the measured
growth over the process's baseline; on a CUDA machine the torch rows add the GPU's peak (torch's
max_memory_allocated), and the training rows set that against the model instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import measured, threading_environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "arith"
MODEL = dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=49152)
MIB = 2**20


# ---------------------------------------------------------------- the model
def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, kv = cfg["hidden"], cfg["inter"], cfg["kv"] * cfg["hidden"] // cfg["heads"]
    out = {"model.embed_tokens.weight": (cfg["vocab"], h)}
    for n in range(cfg["layers"]):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (cfg["vocab"], h)})
    return out


def make_model(folder: Path, cfg: dict = MODEL) -> Path:
    """The random bf16 Llama, with SmolLM2's tokenizer (written tensor by tensor)."""
    import numpy as np

    from pissa.files.formats import hf
    from pissa.files.loaders import open_model
    from pissa.numeric.dtypes import np_dtype

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bf16 = np_dtype("bfloat16")
    plan = shapes(cfg)
    writer = hf.ModelWriter(tmp, [(n, bf16, s) for n, s in plan.items()], max_shard_bytes=1 << 30)
    rng = np.random.default_rng(0)
    for name, shape in plan.items():
        w = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, np.float32) * 0.02
        writer.write(name, w.astype(bf16))
        del w
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
              "intermediate_size": cfg["inter"], "num_hidden_layers": cfg["layers"],
              "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv"],
              "head_dim": cfg["hidden"] // cfg["heads"], "vocab_size": cfg["vocab"], "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    hf.write_json(tmp / "config.json", hf.model_config(config, "bfloat16"))
    open_model("smollm2-135m").save_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def largest_tensor_bytes(folder: Path) -> int:
    from pissa.files.loaders import open_model

    source = open_model(str(folder))
    itemsize = 2 if source.storage_dtype in ("bfloat16", "float16") else 4
    return max(int(__import__("numpy").prod(s)) for s in source.shapes().values()) * itemsize


# ---------------------------------------------------------------- measurements (child side)
def child_init(model: str, out: str, init: str, kind: str) -> dict:
    from pissa.adapters.spec import AdapterSpec
    from pissa.jobs.init import run_init

    spec = AdapterSpec(rank=16, kind=kind, init=init if kind == "lora" else None, dtype=None,
                       compute_dtype="float32")
    return measured(lambda: {"line": run_init(model, out, spec, backend="numpy", force=True,
                                              progress=False).line()})


def child_train(backend: str, model: str, out: str, precision: str, seq: str, steps: str) -> dict:
    from pissa.training.run import TrainConfig
    from pissa.training.train import train

    cfg = TrainConfig(steps=int(steps), batch_size=1, max_seq_len=int(seq), lr=1e-4, precision=precision,
                      grad_checkpointing=True)
    data = Path(out).with_name("text.jsonl")  # plain text: every row is full, whatever --seq
    data.write_text("".join(json.dumps({"text": " ".join(["the model reads and writes text"] * 400)}) + "\n"
                            for _ in range(4)))

    def run():
        s = train(backend, model, data, out, cfg, force=True, progress=False)
        extra = {"tokens_per_s": round(s["tokens_per_s"], 1)}
        if backend == "mlx":
            import mlx.core as mx

            extra["mlx_peak_mib"] = round(mx.get_peak_memory() / MIB)
        return extra

    return measured(run)


def child_eval(backend: str, model: str) -> dict:
    from pissa.studies.evaluate import evaluate

    return measured(lambda: {"accuracy": evaluate(backend, model, DATA / "eval.jsonl", limit=4, batch_size=4,
                                                  max_new_tokens=8, progress=False)["accuracy"]})


def child_kl(model: str, out: str, kl: bool) -> dict:
    from pissa.adapters.spec import AdapterSpec
    from pissa.jobs.init import run_init
    from pissa.numeric.quant import scheme
    from pissa.studies import stepzero

    spec = AdapterSpec(rank=16, init="pissa-fast", dtype=None, compute_dtype="float32")

    def run():
        s = run_init(model, out, spec, backend="torch", force=True, progress=False, quantize=scheme("nf4", 64),
                     quant_iters=1,
                     measure=functools.partial(stepzero.measure_init, force=True) if kl else None)
        return {"kl_line": s.kl_line}
    return measured(run)


CHILDREN = {"init": child_init, "train": child_train, "eval": child_eval, "kl": child_kl}


# ---------------------------------------------------------------- parent
def child(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted_train_mib(base_bytes: int, seq: int) -> float:
    """scripts/scaling_model.py's memory() for this benchmark's model, one sequence of `seq`."""
    from scaling_model import memory_of

    c = MODEL
    return memory_of((c["hidden"], c["inter"], c["layers"], c["heads"], c["kv"], c["hidden"] // c["heads"],
                      c["vocab"]), seq=seq, micro=1, base_bytes=base_bytes) / MIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="where the model and runs go (default: a temporary folder)")
    p.add_argument("--parts", default="init,train,eval,kl")
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--seq", type=int, default=256, help="tokens per training sequence (default 256)")
    p.add_argument("--steps", type=int, default=2, help="training steps per row (default 2; bf16 matmuls on a CPU "
                                                        "without bf16 units are very slow: 1 step and a short --seq)")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*rest)))
        return

    print(threading_environment())
    work = Path(args.work or tempfile.mkdtemp(prefix="pissa-bench-memory-"))
    parts, backends = args.parts.split(","), args.backends.split(",")
    model = make_model(work / "model-1b")
    largest = largest_tensor_bytes(model)
    print(f"model: {model} ({sum(f.stat().st_size for f in model.glob('*.safetensors')) / 2**30:.2f} GiB in bf16), "
          f"largest tensor {largest / MIB:.0f} MiB")
    rows = []
    init = work / "init-lora"
    if "init" in parts or not (init / "pissa_init").is_dir():  # the other parts need init-lora only
        for name, method, kind in (("lora", "lora", "lora"), ("pissa-fast", "pissa-fast", "lora"))[
                :2 if "init" in parts else 1]:
            r = child("init", model, work / f"init-{name}", method, kind)
            rows.append((f"init --init {name} (numpy, bf16 out)", r, f"anon peak / largest tensor "
                         f"{r['anon_peak_mib'] / (largest / MIB):.2f}"))
    if "train" in parts:
        for backend in backends:
            peaks = {}
            for precision in ("fp32", "bf16"):
                r = child("train", backend, init, work / f"run-{backend}-{precision}", precision, args.seq, args.steps)
                pred = predicted_train_mib(4 if precision == "fp32" else 2, args.seq)
                if "cuda_peak_mib" in r:  # on a GPU the model's figure is the device's memory
                    where, used = "CUDA", r["cuda_peak_mib"]
                else:
                    where, used = "anon", r["anon_peak_mib"] - r["anon_base_mib"]
                peaks[precision] = r.get("cuda_peak_mib", r["anon_peak_mib"])
                rows.append((f"train {args.steps} steps x {args.seq} tokens, {backend}, {precision}", r,
                             f"{where} {used:.0f} MiB, model predicts {pred:.0f} MiB ({used / pred - 1:+.0%})"))
            rows.append((f"train {backend}: bf16 / fp32 {where} peak", {}, f"{peaks['bf16'] / peaks['fp32']:.2f}"))
    if "eval" in parts:
        for backend in backends:
            rows.append((f"eval (4 prompts), {backend}", child("eval", backend, init), ""))
    if "kl" in parts:
        without = child("kl", model, work / "qpissa", "")
        with_kl = child("kl", model, work / "qpissa-kl", "1")
        rows += [("QPiSSA init (nf4, torch)", without, ""),
                 ("QPiSSA init + step-0 KL", with_kl,
                  f"KL / init anon peak {with_kl['anon_peak_mib'] / without['anon_peak_mib']:.2f}; {with_kl['kl_line']}")]
    print("\n| measurement | seconds | peak RSS MiB | peak anonymous MiB | peak CUDA MiB | note |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, r, note in rows:
        print(f"| {name} | {r.get('seconds', '')} | {r.get('rss_peak_mib', '')} | {r.get('anon_peak_mib', '')} | "
              f"{r.get('cuda_peak_mib', '')} | {note} |")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
