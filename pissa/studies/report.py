"""What `pissa compare` writes: results.jsonl, pareto.png (forgetting against learning, one colour
per method), lr.png (learning and forgetting against the learning rate) and report.md (the
tables, the best setting per method, the checks of the published shapes, the weight-change
spectrum, and the plots)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"full": "tab:red", "lora": "tab:blue", "pissa": "tab:green", "mora": "tab:purple", "qpissa": "tab:olive",
          "dora": "tab:orange", "olora": "tab:brown", "milora": "tab:pink", "pissa-fast": "tab:cyan"}
COLUMNS = [("target_exact_match", "target EM", "{:.1%}"), ("target_loss", "target loss", "{:.4f}"),
           ("general_loss", "general loss", "{:.4f}"), ("general_kl", "general KL", "{:.5f}"),
           ("probe_accuracy", "probe acc.", "{:.1%}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
           ("peak_mib", "peak MiB", "{:.0f}")]


def label(row: dict) -> str:
    return row["method"] if row["rank"] is None else f"{row['method']} r{row['rank']}"


def last_rows(rows: list[dict], steps: int) -> list[dict]:
    return [r for r in rows if r["step"] == steps]


def best(rows: list[dict], steps: int) -> dict[str, dict]:
    """Per method, its run with the highest target exact match at the last step (ties: lower loss)."""
    out: dict[str, dict] = {}
    for r in last_rows(rows, steps):
        if "diverged" in r:
            continue
        key = (r["target_exact_match"], -r["target_loss"])
        if r["method"] not in out or key > (out[r["method"]]["target_exact_match"], -out[r["method"]]["target_loss"]):
            out[r["method"]] = r
    return out


def table(rows: list[dict], with_step: bool = False) -> str:
    head = ["method", "rank", "lr"] + (["step"] if with_step else []) + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], "-" if r["rank"] is None else str(r["rank"]), f"{r['lr']:g}"]
        cells += [str(r["step"])] if with_step else []
        if "diverged" in r:
            cells += ["diverged"] + [""] * (len(COLUMNS) - 1)
        else:
            cells += [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shapes(rows: list[dict], grid) -> list[str]:
    """The two published shapes, checked on these rows, in words."""
    final = {(r["method"], r["lr"]): r for r in last_rows(rows, grid.steps) if "diverged" not in r
             and (r["rank"] in (None, grid.ranks[0]))}
    notes = []
    for lr in sorted({lr for _, lr in final}):
        p, q = final.get(("pissa", lr)), final.get(("lora", lr))
        if p and q:
            ahead = p["target_loss"] < q["target_loss"]
            forgets_more = p["general_kl"] > q["general_kl"]
            notes.append(f"- lr {lr:g}: PiSSA {'ahead of' if ahead else 'behind'} LoRA after {grid.steps} steps "
                         f"(target loss {p['target_loss']:.4f} vs {q['target_loss']:.4f}, exact match "
                         f"{p['target_exact_match']:.1%} vs {q['target_exact_match']:.1%}) and "
                         f"{'forgets more' if forgets_more else 'forgets less'} (general KL {p['general_kl']:.5f} vs "
                         f"{q['general_kl']:.5f}; probe {p['probe_accuracy']:.1%} vs {q['probe_accuracy']:.1%}).")
    for lr in sorted({lr for _, lr in final}):
        f, q = final.get(("full", lr)), final.get(("lora", lr))
        if f and q:
            learns_less = q["target_loss"] >= f["target_loss"]
            forgets_less = q["general_kl"] <= f["general_kl"]
            notes.append(f"- lr {lr:g}: LoRA {'learns less' if learns_less else 'learns more'} "
                         f"(target loss {q['target_loss']:.4f} vs full {f['target_loss']:.4f}) and "
                         f"{'forgets less' if forgets_less else 'forgets more'} (general KL {q['general_kl']:.5f} vs "
                         f"{f['general_kl']:.5f}; probe {q['probe_accuracy']:.1%} vs {f['probe_accuracy']:.1%}) "
                         "than full fine-tuning.")
    return notes


def plots(out: Path, rows: list[dict], grid) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("pissa compare: plots skipped (matplotlib is not installed: pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "diverged" not in r]
    runs: dict[tuple, list[dict]] = {}
    for r in ok:
        runs.setdefault((r["method"], r["rank"], r["lr"]), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (method, rank, lr), rs in runs.items():
        rs = sorted(rs, key=lambda r: r["step"])
        x = [r["target_loss"] for r in rs]
        for ax, key in zip(axes, ("general_kl", "probe_accuracy")):
            ax.plot(x, [r[key] for r in rs], "o-", color=COLORS.get(method), alpha=0.4 + 0.6 * (lr == max(grid.lrs)),
                    label=f"{label(rs[0])} lr {lr:g}", ms=3)
    for ax, name in zip(axes, ("forgetting: KL from the base model on general text", "knowledge probe accuracy")):
        ax.set_xlabel("learning: target eval loss (lower = learnt more)")
        ax.set_ylabel(name)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("forgetting against learning (each line: one run, step 0 to the end)")
    fig.savefig(out / "pareto.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    final = last_rows(ok, grid.steps)
    for key, ax in zip(("target_loss", "general_kl", "probe_accuracy"), axes):
        for name in sorted({label(r) for r in final}):
            rs = sorted((r for r in final if label(r) == name), key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in rs], [r[key] for r in rs], "o-", color=COLORS.get(rs[0]["method"]), label=name)
        ax.set_xscale("log")
        # The swept rates as the only ticks: a log axis's minor labels overlap over one decade.
        ax.set_xticks(sorted(grid.lrs), [f"{lr:g}" for lr in sorted(grid.lrs)])
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"after {grid.steps} steps")
    fig.savefig(out / "lr.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return ["pareto.png", "lr.png"]


def write(out: Path, rows: list[dict], grid, settings: dict, spectra: dict | None = None) -> None:
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = plots(out, rows, grid)
    g = settings["grid"]
    lines = [f"# pissa compare: learning against forgetting ({settings['backend']})", "",
             f"Model `{settings['model']}`, target data `{settings['data']}` (measured on the first "
             f"{g['eval_limit']} records of `{settings['eval_data']}`); methods {', '.join(g['methods'])}; learning "
             f"rates {', '.join(f'{x:g}' for x in g['lrs'])}; ranks {', '.join(map(str, g['ranks']))}; {g['steps']} steps "
             f"of batch {g['batch_size']}; measured at steps 0, {', '.join(map(str, g['eval_at']))}. Forgetting: "
             f"{g['general_tokens']} tokens of general text (loss, and KL from the base model), and the knowledge "
             "probe (pissa/studies/resources).", "", f"## After {grid.steps} steps", "",
             table(sorted(last_rows(rows, grid.steps), key=lambda r: (r["method"], r["rank"] or 0, r["lr"]))), ""]
    chosen = best(rows, grid.steps)
    if chosen:
        lines += ["## Best setting per method (highest target exact match, then lowest target loss)", "",
                  table([chosen[m] for m in sorted(chosen)]), ""]
    notes = shapes(rows, grid)
    if notes:
        lines += ["## The published shapes, on these runs", "", *notes, ""]
    if spectra:
        types = sorted({t for s in spectra.values() for t in s["ranks"]})
        lines += ["## Rank of the weight change (90% of the variance of dW; median over layers, [min, max])", "",
                  "| method (run) | " + " | ".join(types) + " |", "|" + " --- |" * (len(types) + 1)]
        for method, s in sorted(spectra.items()):
            cells = [f"{s['ranks'][t]['median']:g} [{s['ranks'][t]['min']}, {s['ranks'][t]['max']}]"
                     if t in s["ranks"] else "" for t in types]
            lines.append(f"| {method} ({s['run']}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{name}]({name})" for name in images] + ["", "## Every measured step", "",
                                                          table(rows, with_step=True), ""]
    (out / "report.md").write_text("\n".join(lines))
