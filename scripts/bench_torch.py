"""Benchmark the torch backend against PEFT, side by side in one run, on SmolLM2-135M (fp32,
all linear layers, r=16). Prints a table of ratios; docs/benchmarks.md records the figures.

    python scripts/bench_torch.py [--device cpu|cuda] [--quick] [--skip-quality] [--qpissa | --skip-qpissa]

QPiSSA rows (nf4): init time per iteration (--quant-iters 1 against 5), peak memory of QPiSSA
training against PiSSA training at fp32, and tokens/s of QPiSSA training against QLoRA (PEFT LoRA
on the same bitsandbytes NF4 base). --qpissa runs only those; --smoke shrinks everything to prove
the script runs (its numbers mean nothing).

Each measurement runs in a fresh subprocess, so peak memory (ru_maxrss on the CPU,
torch.cuda.max_memory_allocated on CUDA) belongs to that measurement alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import threading_environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "arith"


# ---------------------------------------------------------------- measurements (child side)
def peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    from pissa.memory import peak_rss_mib

    return peak_rss_mib()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def init_ours(init: str, compute: str, device: str, out: str) -> dict:
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec

    t = time.perf_counter()
    run_init("smollm2-135m", out, AdapterSpec(rank=16, init=init, compute_dtype=compute), backend="torch",
             device=device, progress=False, force=True)
    sync(device)
    return {"seconds": time.perf_counter() - t}


def init_qpissa(scheme: str, iters: int, targets: str, device: str, out: str) -> dict:
    from pissa.jobs.init import run_init
    from pissa.numeric.quant import scheme as make_scheme
    from pissa.adapters.spec import AdapterSpec

    t = time.perf_counter()
    names = targets if targets == "all-linear" else tuple(targets.split(","))
    run_init("smollm2-135m", out, AdapterSpec(rank=16, init="pissa-fast", targets=names), backend="torch",
             device=device, progress=False, force=True, quantize=make_scheme(scheme), quant_iters=iters)
    sync(device)
    return {"seconds": time.perf_counter() - t}


def init_peft(init: str, device: str, out: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pissa.files.loaders import resolve

    t = time.perf_counter()
    path = resolve("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device)
    peft_init = "pissa" if init == "pissa" else "pissa_niter_4"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=peft_init, task_type="CAUSAL_LM"))
    # The official PiSSA layout: the residual model, and the adapter saved as a plain LoRA.
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(Path(out) / "pissa_init")
    # transformers refuses save_pretrained on a model loaded from GGUF (it counts as quantised),
    # so the residual model is written as its state dict plus config, the usual workaround.
    from safetensors.torch import save_model

    base = model.unload()
    save_model(base, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    sync(device)
    return {"seconds": time.perf_counter() - t}


def train_speed(which: str, model_dir: str, device: str, steps: int) -> dict:
    """Tokens/s of forward + backward + AdamW at batch 4 x 256, after 2 warm-up steps."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if which == "ours":  # PiSSA, or QPiSSA on a quantised folder
        from pissa_torch import load

        model, _ = load(model_dir, device=device)
    elif which == "qlora":  # PEFT LoRA on the folder's bitsandbytes NF4 layers: QLoRA's compute path
        from peft import LoraConfig, get_peft_model

        from pissa_torch.quantized import load_base

        modules = json.loads((Path(model_dir) / "config.json").read_text())["pissa_quantization"]["modules"]
        model = get_peft_model(load_base(model_dir, device=device),
                               LoraConfig(r=16, lora_alpha=16, target_modules=modules, task_type="CAUSAL_LM"))
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        model = PeftModel.from_pretrained(base, Path(model_dir) / "pissa_init", is_trainable=True)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.startswith("cuda"))
    ids = torch.randint(0, 49152, (4, 256), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    times = []
    for i in range(steps + 2):
        sync(device)
        t = time.perf_counter()
        if autocast:
            with autocast:
                logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return {"tokens_per_s": 4 * 256 * len(times) / sum(times), "peak_mib": peak_mib(device)}


def quality(init: str, lr: float, steps: int, device: str, work: str) -> dict:
    """Eval loss after `steps` steps of our trainer (batch 4, r=16, all linear, loss on completions)."""
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec
    from pissa.training.run import TrainConfig
    from pissa.training.train import train

    model_dir = Path(work) / f"init-{init}"
    if not model_dir.exists():
        run_init("smollm2-135m", model_dir, AdapterSpec(rank=16, init=init, compute_dtype="float32"),
                 backend="torch", device=device, progress=False)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, max_seq_len=128, seed=0)
    s = train("torch", model_dir, DATA / "train.jsonl", Path(work) / f"run-{init}-{lr}", cfg, eval_data=DATA / "eval.jsonl",
              device=device, force=True, progress=False)
    return {"eval_loss": s["eval_loss"], "train_loss": s["loss"]}


def child(spec: str) -> None:
    kind, args = json.loads(spec)
    fn = {"init_ours": init_ours, "init_peft": init_peft, "init_qpissa": init_qpissa, "train_speed": train_speed,
          "quality": quality}[kind]
    print("RESULT " + json.dumps(fn(*args)), flush=True)


# ---------------------------------------------------------------- orchestration (parent side)
def measure(*args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([args[0], list(args[1:])])],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer timing steps and quality steps")
    ap.add_argument("--skip-quality", action="store_true", help="skip the PiSSA vs LoRA eval-loss runs")
    ap.add_argument("--qpissa", action="store_true", help="only the QPiSSA rows")
    ap.add_argument("--skip-qpissa", action="store_true", help="leave out the QPiSSA rows")
    ap.add_argument("--smoke", action="store_true", help="QPiSSA rows at toy sizes (q_proj only, 1 step): proves "
                                                         "the script runs, the numbers mean nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print("# " + threading_environment())
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# bench_torch: SmolLM2-135M, fp32 weights, all linear layers, r=16, device {device} [{name}], "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as work:
        if a.qpissa or a.smoke:
            print_table(["measure", "QPiSSA", "baseline", "ratio"], qpissa_rows(work, device, a.quick, a.smoke))
            return
        # A first run pays for the cold page cache and first imports; it once made our init look
        # 2x slower than the same measurement repeated. Warm up, then take the best of two
        # interleaved runs per side.
        measure("init_ours", "pissa-fast", "float32", device, f"{work}/warm")
        for init in ("pissa", "pissa-fast"):
            ours, peft = float("inf"), float("inf")
            for _ in range(2):
                ours = min(ours, measure("init_ours", init, "float32", device, f"{work}/o-{init}")["seconds"])
                peft = min(peft, measure("init_peft", init, device, f"{work}/p-{init}")["seconds"])
            rows.append((f"init {init} (float32), end to end", f"{ours:.1f} s", f"{peft:.1f} s",
                         f"{ours / peft:.2f} (target <= 1.0)"))
        for init in ("pissa", "pissa-fast"):
            f64 = measure("init_ours", init, "float64", device, f"{work}/o64-{init}")["seconds"]
            f32 = measure("init_ours", init, "float32", device, f"{work}/o32-{init}")["seconds"]
            rows.append((f"init {init}: float64 default vs float32", f"{f64:.1f} s", f"{f32:.1f} s (ours f32)",
                         f"{f64 / f32:.2f} (cost of float64)"))
        steps = 3 if a.quick else 8
        # Peak RSS of identical runs spreads by about 250 MiB here (glibc's arenas under two
        # OpenMP threads), so one run per side decides nothing: interleave three and take medians.
        runs = {"ours": [], "peft": []}
        for _ in range(1 if a.quick else 3):
            for who in runs:
                runs[who].append(measure("train_speed", who, f"{work}/o-pissa-fast", device, steps))
        med = {who: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_mib")}
               for who, rs in runs.items()}
        ours, peft = med["ours"], med["peft"]
        spread = lambda who, k: "/".join(f"{r[k]:.0f}" for r in runs[who])  # noqa: E731
        rows.append(("train tokens/s, batch 4 x 256 (median)", f"{ours['tokens_per_s']:.0f} ({spread('ours', 'tokens_per_s')})",
                     f"{peft['tokens_per_s']:.0f} ({spread('peft', 'tokens_per_s')})",
                     f"{ours['tokens_per_s'] / peft['tokens_per_s']:.2f} (target >= 1.0)"))
        rows.append(("train peak memory (MiB, median)", f"{ours['peak_mib']:.0f} ({spread('ours', 'peak_mib')})",
                     f"{peft['peak_mib']:.0f} ({spread('peft', 'peak_mib')})",
                     f"{ours['peak_mib'] / peft['peak_mib']:.2f} (target <= 1.0)"))
        print_table(["measure", "ours", "PEFT", "ratio"], rows)
        if not a.skip_qpissa:
            print()
            print_table(["measure", "QPiSSA", "baseline", "ratio"], qpissa_rows(work, device, a.quick, False))
        if a.skip_quality:
            return
        qsteps = 10 if a.quick else 40
        qrows = []
        for lr in (2e-5, 2e-4):
            p = measure("quality", "pissa", lr, qsteps, device, work)
            q = measure("quality", "lora", lr, qsteps, device, work)
            qrows.append((f"{lr:g}", f"{p['eval_loss']:.3f}", f"{q['eval_loss']:.3f}", f"{p['eval_loss'] / q['eval_loss']:.2f}"))
        print(f"\n# eval loss after {qsteps} steps (batch 4, r=16, all linear, arithmetic chat task, "
              "loss on completions; PEFT anchor: lr 2e-5 PiSSA 0.17 / LoRA 0.84, lr 2e-4 0.16 / 0.15)")
        print_table(["lr", "PiSSA", "LoRA", "PiSSA / LoRA"], qrows)


def qpissa_rows(work: str, device: str, quick: bool, smoke: bool) -> list[tuple[str, str, str, str]]:
    """nf4 QPiSSA against its baselines: init time per iteration, training memory and speed."""
    targets = "q_proj" if smoke else "all-linear"
    iters = 2 if quick or smoke else 5
    steps = 1 if smoke else 3 if quick else 8
    rows = []
    t1 = measure("init_qpissa", "nf4", 1, targets, device, f"{work}/q1")["seconds"]
    tn = measure("init_qpissa", "nf4", iters, targets, device, f"{work}/qn")["seconds"]
    rows.append((f"QPiSSA nf4 init ({targets}): {iters} iterations vs 1", f"{tn:.1f} s", f"{t1:.1f} s",
                 f"{(tn - t1) / (iters - 1):.1f} s per extra iteration"))
    plain = f"{work}/o-pissa-fast"
    if not Path(plain).exists():
        measure("init_ours", "pissa-fast", "float32", device, plain)
    q = measure("train_speed", "ours", f"{work}/q1", device, steps)
    p = measure("train_speed", "ours", plain, device, steps)
    qlora = measure("train_speed", "qlora", f"{work}/q1", device, steps)
    rows.append(("train peak memory (MiB): QPiSSA vs PiSSA fp32", f"{q['peak_mib']:.0f}", f"{p['peak_mib']:.0f}",
                 f"{q['peak_mib'] / p['peak_mib']:.2f}"))
    rows.append(("train tokens/s, batch 4 x 256: QPiSSA vs QLoRA (PEFT)", f"{q['tokens_per_s']:.0f}",
                 f"{qlora['tokens_per_s']:.0f}", f"{q['tokens_per_s'] / qlora['tokens_per_s']:.2f} (target >= 1.0)"))
    rows.append(("train peak memory (MiB): QPiSSA vs QLoRA (PEFT)", f"{q['peak_mib']:.0f}", f"{qlora['peak_mib']:.0f}",
                 f"{q['peak_mib'] / qlora['peak_mib']:.2f}"))
    return rows


def print_table(head: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
