"""Training throughput on data shaped like instruction data, against the trainers users compare
pissa with, in one run: real tokens per second (prompt and answer tokens of the records, pads not
counted) and peak memory, each trainer in a child process of its own, all on the same records,
model, rank and targets for one epoch.

    python scripts/bench_train.py [--model 135m|1b|8b] [--records 128] [--precision fp32|bf16]
                                  [--only NAME,...] [--profile] [--smoke]
    pip install -e ".[bench]"   # TRL, the benchmark-only reference

Models: 135m is the embedded SmolLM2-135M; 1b a random 1.2B Llama and 8b random weights in
Llama-3-8B's shapes (bf16, a GPU only), both made on the spot with SmolLM2's tokenizer.
The records (made here, offline, seeded): a prompt of ~6-300 tokens and an answer of ~3-100,
long-tailed as instruction data is (most short, a few long), the loss on the answer only.
On a machine with a CUDA GPU the torch rows run on it (the MLX rows need Apple's or Linux's MLX).
--precision bf16 trains every torch row in bf16 as its users would: pissa's frozen weights in bf16
with float32 adapters, PEFT's model loaded in bf16 (its adapters stay float32), TRL with bf16=True.

pissa's rows report steady-state tokens/s: from the end of the first step to the end of the last
(metrics.jsonl's elapsed), so neither the first step's warm-up (allocations, compilation) nor the
set-up and final writes count; the others' seconds are their whole train() call. MFU is the
training FLOPs of the tokens (flops_per_token) per second over the matrix product's measured peak.

Rows:
- pissa torch, packed (the default) and --no-packing; pissa MLX, packed and --no-packing;
- PEFT + transformers in the loop most users write: shuffled batches of 4 records padded to the
  longest, labels on the answer, AdamW;
- TRL's SFTTrainer with PEFT, with its padding-free batches and with its packing (bfd);
- mlx-lm's LoRA trainer (sorted by length, padded to a multiple of 32);
- row shape, on each backend: short records (25-70 tokens) in one row of 2048 tokens a step against
  8 rows of 256 (the same tokens a step): what attention within each record saves a packed row;
- the roofline on this machine: what an ideal trainer reaches at the measured matrix speed, from
  pissa torch on equal-length, full rows (where padding and prompts cost nothing to anyone).
--profile adds torch.profiler's breakdown of pissa torch's steady steps: attention, the adapters'
products, the loss, the optimizer, all matrix products, and on a GPU its busy and idle time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import measured, threading_environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANK, LR, BATCH, MAX_LEN = 16, 1e-4, 4, 512
SHORT_ROWS = {"rows-2048x1": (2048, 1), "rows-256x8": (256, 8)}  # (--max-seq-len, --batch-size): 2048 tokens a step
# Llama-3-8B's shapes (random weights, bf16): the GPU benchmark's users' scale.
LLAMA3_8B = {"hidden": 4096, "inter": 14336, "layers": 32, "heads": 32, "kv": 8, "vocab": 128256}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the data
def make_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion records whose token lengths are long-tailed: prompt ~ 6-300 and answer
    ~ 3-100 (a Pareto tail over a floor), made of words from the general text that ships with pissa."""
    import numpy as np

    from pissa.studies.forgetting import GENERAL

    words = " ".join(json.loads(line)["text"] for line in GENERAL.read_text().splitlines()).split()
    rng = np.random.default_rng(seed)

    def text(lo: int, hi: int, alpha: float) -> str:
        k = int(min(hi, lo + rng.pareto(alpha) * lo * 2))
        start = int(rng.integers(0, len(words) - k))
        return " ".join(words[start:start + k])

    # ~1.3 tokens per word with SmolLM2's tokenizer: words 5-230 and 2-75 give the token ranges
    return [{"prompt": text(5, 230, 1.2) + "\n", "completion": text(2, 75, 1.5)} for _ in range(n)]


def make_short_records(n: int, seed: int = 1) -> list[dict]:
    """Short prompt/completion records of about 25-70 tokens, to fill rows of 256 or 2048 tokens."""
    import numpy as np

    from pissa.studies.forgetting import GENERAL

    words = " ".join(json.loads(line)["text"] for line in GENERAL.read_text().splitlines()).split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k, a = int(rng.integers(12, 35)), int(rng.integers(5, 18))
        start = int(rng.integers(0, len(words) - k - a))
        out.append({"prompt": " ".join(words[start:start + k]) + "\n", "completion": " ".join(words[start + k:start + k + a])})
    return out


def token_counts(model_dir: Path, data: Path) -> dict:
    from pissa.training.data import load_dataset
    from pissa.files.tokenizer import load_tokenizer

    ds = load_dataset(data, load_tokenizer(model_dir), MAX_LEN)
    lengths = [len(e.input_ids) for e in ds.examples]
    answers = [sum(label >= 0 for label in e.labels) for e in ds.examples]
    return {"records": len(lengths), "tokens": sum(lengths), "answer_tokens": sum(answers),
            "median": sorted(lengths)[len(lengths) // 2], "max": max(lengths), "truncated": ds.truncated}


# ---------------------------------------------------------------- children
def steady(rows: list[dict]) -> float | None:
    """Tokens per second from the end of the first step to the end of the last (metrics.jsonl)."""
    steps = [r for r in rows if "loss" in r]
    if len(steps) < 2:
        return None
    return sum(r["tokens"] for r in steps[1:]) / max(steps[-1]["elapsed"] - steps[0]["elapsed"], 1e-9)


def child_pissa(backend: str, model: str, data: str, out: str, packing: str, precision: str,
                batch: str = str(BATCH), max_len: str = str(MAX_LEN), profile: str = "0") -> dict:
    from pissa.training.run import TrainConfig
    from pissa.training.train import train

    cfg = TrainConfig(epochs=1, batch_size=int(batch), lr=LR, max_seq_len=int(max_len), packing=packing == "1",
                      precision=precision, warmup_ratio=0.0)

    def run():
        profiler = profiled() if profile == "1" else None
        s = train(backend, model, data, out, cfg, force=True, progress=False)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((Path(out) / "config.json").read_text())
        result = {"tokens": sum(r.get("tokens", 0) for r in rows), "steps": s["steps"], "batching": config["batching"],
                  "train_seconds": s["seconds"], "steady_tokens_per_s": steady(rows)}
        if backend == "mlx":
            import mlx.core as mx

            result["mlx_peak_mib"] = round(mx.get_peak_memory() / 2**20)
        if profiler is not None:
            result["profile"] = profiler.breakdown()
        return result
    return measured(run, interval=0.01)


class profiled:
    """torch.profiler over steps 3-5 of a pissa torch run, with ranges around the parts a step is
    made of (wrapped in place for this child process only): attention within records, the adapter
    layers' products, the chunked loss, the optimizer step."""

    PARTS = {"attention": ("pissa_torch.attention", "varlen"), "adapter": ("pissa_torch.layers.lora", "PissaLinear.update"),
             "loss": ("pissa_torch.loss", "head_loss"), "optimizer": ("pissa_torch.train", "Trainer.update")}
    MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product")

    def __init__(self):
        import importlib

        import torch
        from torch.profiler import ProfilerActivity, profile, record_function, schedule

        self.torch = torch
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1))
        self.steps = 0
        for name, (module, attr) in self.PARTS.items():
            owner = importlib.import_module(module)
            target, _, method = attr.partition(".")
            holder = getattr(owner, target) if method else owner
            real = getattr(holder, method or target)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                with record_function(_name):
                    return _real(*args, **kwargs)

            setattr(holder, method or target, wrapped)
        update = getattr(importlib.import_module("pissa_torch.train"), "Trainer").update

        def step_and_tick(trainer, lr, _update=update):
            _update(trainer, lr)
            self.prof.step()
            self.steps += 1

        importlib.import_module("pissa_torch.train").Trainer.update = step_and_tick
        self.prof.start()

    def breakdown(self) -> dict:
        """Milliseconds per profiled step: wall time, each part, all matrix products, and on CUDA the
        GPU's busy time (its kernels') and idle time (wall - busy)."""
        self.prof.stop()
        events = self.prof.key_averages()
        steps = 3
        cuda = self.torch.cuda.is_available()

        def total(e):
            return (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / steps

        out = {name: round(sum(total(e) for e in events if e.key == name), 1) for name in self.PARTS}
        out["matmuls"] = round(sum((e.self_device_time_total if cuda else e.self_cpu_time_total)
                                   for e in events if e.key.startswith(self.MATMULS)) / 1e3 / steps, 1)
        wall = [e for e in events if e.key.startswith("ProfilerStep")]
        out["step_wall"] = round(sum(e.cpu_time_total for e in wall) / 1e3 / steps, 1)
        if cuda:
            busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / steps
            out["gpu_busy"], out["gpu_idle"] = round(busy, 1), round(out["step_wall"] - busy, 1)
        return out


def _peft_model(model_dir: str, precision: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device())
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, task_type="CAUSAL_LM"))


def child_peft(model: str, data: str, precision: str) -> dict:
    """The loop most PEFT users write: shuffled batches padded to the longest, answer-only labels."""
    import torch

    from pissa.training.batches import Plan, collate_rows
    from pissa.numeric.loss import IGNORE
    from pissa.training.data import load_dataset
    from pissa.files.tokenizer import load_tokenizer, pad_id

    tok = load_tokenizer(model)
    ds = load_dataset(data, tok, MAX_LEN)
    net = _peft_model(model, precision)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    plan = Plan([len(e.input_ids) for e in ds.examples], BATCH, MAX_LEN, 0, "padded")

    def run():
        t0, tokens = time.perf_counter(), 0
        for k in range(math.ceil(len(ds.examples) / BATCH)):
            b = {key: torch.from_numpy(v).to(device())
                 for key, v in collate_rows(ds.examples, plan.micro(k), pad_id(tok)).items()}
            logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                                     ignore_index=IGNORE)
            loss.backward()
            opt.step()
            opt.zero_grad()
            tokens += int(b["attention_mask"].sum())
        synchronize()
        return {"tokens": tokens, "train_seconds": round(time.perf_counter() - t0, 1)}
    return measured(run, interval=0.01)


def child_trl(model: str, data: str, out: str, how: str, precision: str) -> dict:
    """TRL's SFTTrainer with PEFT's LoRA: how = "padding_free" or "packing" (bfd)."""
    from datasets import load_dataset as hf_load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = hf_load_dataset("json", data_files=data, split="train")
    # padding-free without packing does not truncate (TRL refuses max_length then): the records fit anyway
    cfg = SFTConfig(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                    max_length=None if how == "padding_free" else MAX_LEN, use_cpu=device() == "cpu",
                    bf16=precision == "bf16",
                    padding_free=how == "padding_free", packing=how == "packing", completion_only_loss=True,
                    logging_steps=1000, save_strategy="no", report_to=[], lr_scheduler_type="constant",
                    warmup_steps=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=_peft_model(model, precision), args=cfg, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model))
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])

    def run():
        t0 = time.perf_counter()
        trainer.train()
        synchronize()
        return {"tokens": tokens, "train_seconds": round(time.perf_counter() - t0, 1)}
    return measured(run, interval=0.01)


def child_mlx_lm(model: str, data: str, out: str) -> dict:
    """mlx-lm's LoRA trainer on the same records: its CompletionsDataset (answer-only loss),
    batches sorted by length and padded to a multiple of 32."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, CompletionsDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    net, tok = load(model)
    net.freeze()
    linear_to_lora_layers(net, len(net.layers), {"rank": RANK, "scale": 1.0, "dropout": 0.0,
                                                "keys": [f"self_attn.{k}" if k.endswith(("q_proj", "k_proj", "v_proj",
                                                         "o_proj")) else f"mlp.{k}" for k in TARGETS]})
    records = [json.loads(line) for line in Path(data).read_text().splitlines()]
    dataset = CacheDataset(CompletionsDataset(records, tok, "prompt", "completion", mask_prompt=True))
    iters = math.ceil(len(records) / BATCH)
    args = TrainingArgs(batch_size=BATCH, iters=iters, max_seq_length=MAX_LEN, steps_per_report=10**6,
                        steps_per_eval=10**6, steps_per_save=10**6, adapter_file=str(Path(out) / "adapters.safetensors"))
    Path(out).mkdir(parents=True, exist_ok=True)

    def run():
        t0 = time.perf_counter()
        train(net, optim.AdamW(learning_rate=LR), dataset, None, args=args)  # no validation passes: training only
        tokens = sum(len(dataset[i][0]) for i in range(len(dataset)))
        return {"tokens": tokens, "train_seconds": round(time.perf_counter() - t0, 1),
                "mlx_peak_mib": round(mx.get_peak_memory() / 2**20)}
    return measured(run, interval=0.01)


def child_roofline(model: str, out: str, precision: str) -> dict:
    """The matrix product's GFLOP/s here (sgemm on a CPU; on a GPU in the training precision), and
    pissa torch on equal-length full rows (batch 4 x MAX_LEN)."""
    import torch

    n = 2048 if device() == "cpu" else 8192
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    for _ in range(2):
        a @ a
    synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    synchronize()
    gflops = 10 * 2 * n**3 / (time.perf_counter() - t) / 1e9
    data = Path(out) / "equal.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    words = " ".join(["the model reads and writes text"] * 200)
    data.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(16 if device() == "cpu" else 256)))
    r = child_pissa("torch", model, str(data), str(Path(out) / "run"), "0", precision)
    return {**r, "sgemm_gflops": round(gflops, 1)}


CHILDREN = {"pissa": child_pissa, "peft": child_peft, "trl": child_trl, "mlx_lm": child_mlx_lm,
            "roofline": child_roofline}


def child(kind: str, *args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flops_per_token(model_dir: Path) -> float:
    """Training FLOPs per token of a LoRA run: 2 per weight in the forward, 2 more for the input
    gradients in the backward (the frozen weights need no weight gradient), with the head's."""
    from pissa.files.loaders import open_model

    weights = sum(int(math.prod(s)) for n, s in open_model(str(model_dir)).shapes().items()
                  if len(s) == 2 and "embed_tokens" not in n)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("tie_word_embeddings"):
        weights += cfg["vocab_size"] * cfg["hidden_size"]
    return 4.0 * weights


def rate(r: dict) -> float | None:
    """A row's tokens/s: pissa's steady state, the others' whole train() call."""
    if r.get("steady_tokens_per_s"):
        return r["steady_tokens_per_s"]
    return r["tokens"] / r["train_seconds"] if "tokens" in r and r.get("train_seconds") else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="135m", choices=["135m", "smollm2", "1b", "8b"],
                   help="135m (the embedded SmolLM2-135M; smollm2 says the same), 1b (a random 1.2B Llama) or 8b "
                        "(random weights in Llama-3-8B's shapes: bf16, a GPU only)")
    p.add_argument("--records", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="of every torch row (default fp32)")
    p.add_argument("--only", default=None, help="comma-separated rows to run (pissa,pissa-padded,peft,trl-padding-free,"
                                                 "trl-packing,pissa-mlx,pissa-mlx-padded,mlx-lm,rows-2048x1,"
                                                 "rows-256x8,mlx-rows-2048x1,mlx-rows-256x8,roofline)")
    p.add_argument("--profile", action="store_true", help="torch.profiler's breakdown of pissa torch's steady steps")
    p.add_argument("--work", default=None)
    p.add_argument("--smoke", action="store_true", help="16 records: checks the script runs (numbers mean nothing)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*rest)))
        return

    from pissa.adapters.spec import AdapterSpec
    from pissa.files.tokenizer import load_tokenizer
    from pissa.jobs.init import run_init

    if args.model == "8b" and device() != "cuda":
        raise SystemExit("bench_train: --model 8b needs a CUDA GPU (16 GiB of bf16 weights); use 135m or 1b here")
    print(threading_environment())
    work = Path(args.work or tempfile.mkdtemp(prefix="pissa-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    n = 16 if args.smoke else args.records
    data, short = work / "records.jsonl", work / "short.jsonl"
    if args.model in ("1b", "8b"):
        from bench_memory import MODEL, make_model

        source = make_model(work / f"model-{args.model}", MODEL if args.model == "1b" else LLAMA3_8B)
    else:
        source = work / "smollm2"
        if not (source / "config.json").is_file():
            run_init("smollm2-135m", source, AdapterSpec(kind="full", dtype="float32"), progress=False)
    init = work / f"init-{args.precision}"
    if not (init / "pissa_init").is_dir():  # on a GPU torch decomposes there; a bf16 run keeps a bf16 residual
        run_init(str(source), init, AdapterSpec(rank=RANK, init="pissa-fast", compute_dtype="float32",
                                                dtype="float32" if args.precision == "fp32" else None),
                 backend="torch" if device() == "cuda" else "numpy", progress=False)
    tok = load_tokenizer(init)  # a record longer than a row would be cut (pissa refuses an answer cut away)
    records = [r for r in make_records(n) if len(tok(r["prompt"] + r["completion"])["input_ids"]) < MAX_LEN - 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # short records: 8 steps of 2048 tokens (a few more on a GPU)
    short.write_text("".join(json.dumps(r) + "\n" for r in make_short_records(48 if args.smoke else
                                                                               (1600 if device() == "cuda" else 400))))
    counts = token_counts(init, data)
    print(f"records: {counts}")
    print(f"short records: {token_counts(init, short)}")
    pr, prof = args.precision, "1" if args.profile else "0"
    plan = {
        "pissa": ("pissa", "torch", init, data, work / "run-pissa", "1", pr, BATCH, MAX_LEN, prof),
        "pissa-padded": ("pissa", "torch", init, data, work / "run-padded", "0", pr),
        "peft": ("peft", source, data, pr),
        "trl-padding-free": ("trl", source, data, work / "trl-pf", "padding_free", pr),
        "trl-packing": ("trl", source, data, work / "trl-pack", "packing", pr),
        "pissa-mlx": ("pissa", "mlx", init, data, work / "run-mlx", "1", pr),
        "pissa-mlx-padded": ("pissa", "mlx", init, data, work / "run-mlx-padded", "0", pr),
        "mlx-lm": ("mlx_lm", source, data, work / "mlx-lm"),
        **{f"{prefix}{name}": ("pissa", backend, init, short, work / f"run-{backend}-{name}", "1", pr, batch, length)
           for backend, prefix in (("torch", ""), ("mlx", "mlx-")) for name, (length, batch) in SHORT_ROWS.items()},
        "roofline": ("roofline", init, work / "roofline", pr),
    }
    only = args.only.split(",") if args.only else list(plan)
    results = {}
    for name in only:
        kind, *rest = plan[name]
        results[name] = r = child(kind, *rest)
        r["tokens_per_s"] = rate(r)
        print(f"{name}: {r}", flush=True)

    def tps(name):
        return results.get(name, {}).get("tokens_per_s")

    def peak(name):
        r = results.get(name, {})
        return r.get("cuda_peak_mib") or r.get("anon_peak_mib")

    roof = results.get("roofline", {})
    fpt = flops_per_token(init)
    peak_flops = roof.get("sgemm_gflops", 0) * 1e9
    print(f"\n{device()}, {args.precision}, model {args.model}\n| trainer | real tokens/s | MFU | peak RSS MiB | "
          "peak anon MiB | peak CUDA MiB | note |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        note = r.get("error") or r.get("batching", "")
        mfu = f"{r['tokens_per_s'] * fpt / peak_flops:.2f}" if peak_flops and r.get("tokens_per_s") else ""
        print(f"| {name} | {r.get('tokens_per_s') or float('nan'):.0f} | {mfu} | {r.get('rss_peak_mib', '')} | "
              f"{r.get('anon_peak_mib', '')} | {r.get('cuda_peak_mib', '')} | {note} |")
    ratios = [("pissa torch / PEFT padded loop", tps("pissa"), tps("peft"), ">= 2"),
              ("pissa torch / TRL best", tps("pissa"), max(filter(None, [tps("trl-padding-free"), tps("trl-packing")]),
                                                          default=None), ">= 1.1 (GPU: >= 1.5)"),
              ("pissa MLX / mlx-lm", tps("pissa-mlx"), tps("mlx-lm"), ">= 2"),
              ("pissa MLX packed / --no-packing", tps("pissa-mlx"), tps("pissa-mlx-padded"), ">= 2"),
              ("torch: 1 row of 2048 / 8 rows of 256, tokens/s", tps("rows-2048x1"), tps("rows-256x8"), ">= 0.9"),
              ("torch: 1 row of 2048 / 8 rows of 256, peak memory", peak("rows-2048x1"), peak("rows-256x8"), "<= 1.1"),
              ("MLX: 1 row of 2048 / 8 rows of 256, tokens/s", tps("mlx-rows-2048x1"), tps("mlx-rows-256x8"), ">= 0.9"),
              ("MLX: 1 row of 2048 / 8 rows of 256, peak memory", peak("mlx-rows-2048x1"), peak("mlx-rows-256x8"),
               "<= 1.1")]
    print("\n| ratio | value | target |\n| --- | --- | --- |")
    for name, a, b, target in ratios:
        if a and b:
            print(f"| {name} | {a / b:.2f} | {target} |")
    if peak_flops and roof.get("tokens_per_s"):
        ideal = peak_flops / fpt
        print(f"| roofline fraction (equal-length rows, pissa torch) | {roof['tokens_per_s'] / ideal:.2f} | >= 0.7 |")
        print(f"\nmatrix product {roof['sgemm_gflops']:.0f} GFLOP/s; {fpt / 1e9:.2f} GFLOP per trained token: "
              f"ideal {ideal:.0f} tokens/s")
    if results.get("pissa", {}).get("profile"):
        print(f"\npissa torch, ms per steady step: {results['pissa']['profile']}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
