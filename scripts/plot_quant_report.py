"""Plot QPiSSA's error reduction against the iteration count, from pissa init's quant_report.json.

One run with --quant-iters T records the error after every iteration 1..T, so one report gives
the whole curve. Several reports (say NF4 and affine4, or r=16 and r=64) share one plot.

    python scripts/plot_quant_report.py OUT_A/quant_report.json [OUT_B/quant_report.json ...] --out reduction.png

Also prints the curve as a table. With --by-module, one line per module type (q_proj, ...)
instead of the mean over all matrices.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "quant_report.json"
    try:
        report = json.loads(p.read_text())
        report["by_module_type"]["all"]["reduction_by_iteration"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"plot_quant_report: error: {p} is not a quant_report.json written by pissa init "
                         f"--quantize ({e.__class__.__name__}); pass OUT/quant_report.json")
    return report


def label(report: dict) -> str:
    return f"{report['scheme']} g{report['group_size']} r{report['rank']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="quant_report.json files (or the folders holding them)")
    ap.add_argument("--out", default="qpissa_reduction.png", help="the PNG to write (default qpissa_reduction.png)")
    ap.add_argument("--by-module", action="store_true", help="one line per module type, not just the mean")
    args = ap.parse_args(argv)
    reports = [load(p) for p in args.reports]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for report in reports:
        groups = report["by_module_type"]
        keys = [k for k in groups if k != "all"] if args.by_module else ["all"]
        for k in keys:
            curve = [100 * x for x in groups[k]["reduction_by_iteration"]]
            name = label(report) + ("" if k == "all" else f" {k}")
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
            print(f"{name:<28} " + "  ".join(f"T={t}: {v:5.1f}%" for t, v in enumerate(curve, 1)))
    longest = max(len(r["by_module_type"]["all"]["reduction_by_iteration"]) for r in reports)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("QPiSSA iterations")
    ax.set_ylabel("error reduction against QLoRA (%)")
    ax.set_title("QPiSSA: nuclear-norm error reduction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
