"""QPiSSA's defaults, judged by the model's function: the step-0 KL per token from the original
SmolLM2 (pissa.studies.stepzero: 1024 tokens of the general text that ships with pissa) of the QPiSSA
model against QLoRA's, over rank and iterations, with the nuclear-norm error reduction of the
report beside it. docs/benchmarks.md records the table and the defaults chosen from it.

    python scripts/bench_qpissa_kl.py --backend torch      # nf4
    python scripts/bench_qpissa_kl.py --backend mlx        # affine4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import threading_environment  # noqa: E402

from pissa.jobs.init import run_init  # noqa: E402
from pissa.studies import stepzero  # noqa: E402
from pissa.numeric.quant import scheme  # noqa: E402
from pissa.adapters.spec import AdapterSpec  # noqa: E402

SCHEME = {"torch": "nf4", "mlx": "affine4"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", help="torch (nf4) or mlx (affine4)")
    p.add_argument("--ranks", default="16,64,128")
    p.add_argument("--iters", default="1,2,5")
    p.add_argument("--init", default="pissa-fast", help="pissa or pissa-fast")
    p.add_argument("--out", default=None, help="write the rows as JSON lines here")
    args = p.parse_args()
    print(threading_environment())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_qpissa_kl-") as tmp:
        for rank in map(int, args.ranks.split(",")):
            for iters in map(int, args.iters.split(",")):
                t0 = time.perf_counter()
                spec = AdapterSpec(rank=rank, init=args.init, compute_dtype="float32")
                run_init("smollm2-135m", Path(tmp) / "q", spec, backend=args.backend, force=True, progress=False,
                         quantize=scheme(SCHEME[args.backend], 64), quant_iters=iters, measure=stepzero.measure_init)
                report = json.loads((Path(tmp) / "q" / "quant_report.json").read_text())
                kl = report["step0_kl"]
                row = {"backend": args.backend, "scheme": SCHEME[args.backend], "rank": rank, "iters": iters,
                       "kl_qpissa": kl["qpissa"], "kl_qlora": kl["qlora"], "kl_gain": 1 - kl["qpissa"] / kl["qlora"],
                       "error_reduction": report["by_module_type"]["all"]["reduction"],
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n| rank | iterations | KL QPiSSA | KL QLoRA | KL lower by | nuclear error lower by | init s |"
          f"\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rank']} | {r['iters']} | {r['kl_qpissa']:.4f} | {r['kl_qlora']:.4f} | {100 * r['kl_gain']:.0f}% | "
              f"{100 * r['error_reduction']:.1f}% | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
