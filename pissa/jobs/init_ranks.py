"""`pissa init` across ranks (torchrun, mlx.launch): each rank decomposes its share of the
matrices, and the folder is byte for byte the one a single process writes.

How the ranks share the work and the files:
1. Every rank opens the model and computes the same schedule (pissa.jobs.init.schedule). The steps are
   split by estimated cost (cost(): a function of the matrix shape and the init method), longest
   first onto the least loaded rank (pissa.dist.assign), so each rank's total is within one step
   of the others'.
2. Rank 0 makes the hidden temporary folder next to OUT and creates the weight files at full
   size with their final headers (hf.PlacedModelWriter: the shards and header bytes of the
   single-process writer, from the same plan). The other ranks learn its name from rank 0's pid.
3. Each rank writes its tensors straight into their places in those files (no second copy of
   the model, and the ranks write in parallel), and leaves its adapter factors and QPiSSA
   report entries as small files in the folder.
4. Rank 0 gathers those in the single-process order, writes what follows the weights exactly as
   the single-process path does (pissa.jobs.init.Job.finish: config, tokenizer, adapter, report), and
   renames the folder: the only rename. A failure on any rank fails every rank (pissa.dist.agree)
   and rank 0 removes the folder.

So the ranks must share the filesystem OUT is on (always true on one machine; across machines,
a shared filesystem). The bytes match a single process's when each rank's arithmetic does:
the same backend, device type and library. LAPACK's SVD can change its last bits with the number
of BLAS threads, so give the single process the same thread count as each rank (torchrun sets
OMP_NUM_THREADS=1 by default) when comparing bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pissa import dist
from pissa.errors import PissaError
from pissa.memory import peak_rss_mib
from pissa.files.formats import hf
from pissa.files.formats.safetensors import load, save

# Cost units: seconds on one core of this project's 2-core machine, fitted to the per-shape
# timings of scripts/bench_svd_shapes.py (docs/scaling.md). Only ratios matter for the split,
# between the decompositions of different shapes and between them and plain copies. Each init
# gives its own decomposition's cost (pissa.adapters.inits: cost()).
COPY = 7.8e-9               # per element of a tensor read, cast and written


def cost(job, step: list[str]) -> float:
    """Estimated seconds of one schedule step (one tensor, or same-shape targets decomposed
    together), from its shape and the init: its decomposition (none for the kinds without an
    init: MoRA, full fine-tuning) and a copy. Each QPiSSA iteration repeats the decomposition and
    a quantisation (about a copy)."""
    shape = job.shapes[step[0]]
    m, n = shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    copy = COPY * m * n * len(step)
    if step[0][: -len(".weight")] not in job.targets:
        return copy
    method = job.spec.init_module
    work = method.cost((m, n), job.spec) if method is not None else 0.0
    iters = job.quant_iters if job.quantize is not None else 1
    return copy + iters * (work + COPY * m * n) * len(step)


def run_ranks(job, group, start: float, progress: bool, max_shard_bytes: int):
    """Run an init Job across `group`'s ranks (see the module docstring). Every rank returns the
    summary; only rank 0's counts cover the whole model."""
    owner = dist.assign([cost(job, step) for step in job.steps], group.size)
    mine = [step for step, rank in zip(job.steps, owner) if rank == group.rank]
    layout = hf.shard_layout(hf.stored_plan(job.plan, job.layout), max_shard_bytes)
    first = group.rank == 0

    def create() -> int:
        job.out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = hf.temp_dir(job.out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            hf.PlacedModelWriter.create(tmp, layout)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return os.getpid()

    pid = dist.agree(group, create, what="creating the output folder", on=(0,))
    tmp = hf.temp_dir(job.out, int(group.all_sum([pid or 0])[0]))

    def remove() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    with dist.cleanup(remove if first else (lambda: None)):
        try:
            dist.agree(group, lambda: _work(job, mine, tmp, layout, group, progress), what="decomposing")
            dist.agree(group, lambda: _assemble(job, tmp, layout, group), what="writing the output folder", on=(0,))
        except BaseException:
            if first:
                remove()
            raise
    peak = np.zeros(group.size)
    peak[group.rank] = peak_rss_mib()
    with group.guard("summing up"):
        peak = group.all_sum(peak)
    job.ranks = group.size
    return job.summary(time.perf_counter() - start, float(peak.max()))


def _part(tmp: Path, rank: int) -> tuple[Path, Path]:
    return tmp / f".rank-{rank:05d}.safetensors", tmp / f".rank-{rank:05d}.json"


def _work(job, mine: list[list[str]], tmp: Path, layout, group, progress: bool) -> None:
    """This rank's steps, written into the shared files; then its factors and report entries."""
    if not tmp.is_dir():
        raise PissaError(f"rank {group.rank} cannot see {tmp}, which rank 0 made: --out must be on a filesystem "
                         "every rank sees")
    count = sum(len(step) for step in mine if step[0][: -len(".weight")] in job.targets)
    bar = job.bar(count, progress and group.rank == 0, note=f", rank 0 of {group.size}")
    writer = hf.PlacedModelWriter(tmp, layout, job.layout)
    try:
        for step in mine:
            job.run(step, writer, bar)
    finally:
        writer.close()
        bar.close()
    tensors, entries = _part(tmp, group.rank)
    arrays = {f"{m}|{i}": p for m, params in job.factors.items() for i, p in enumerate(params)}
    arrays.update({f"{m}|digest": d[0] for m, d in job.digests.items()})  # full fine-tuning: no parameters
    save(tensors, arrays)
    # floats round-trip exactly through repr; "modules" keeps the modules whose parameters are empty
    entries.write_text(json.dumps({"entries": job.entries, "modules": list(job.factors)}))


def _assemble(job, tmp: Path, layout, group) -> None:
    """Rank 0: gather every rank's factors and entries in the single-process order (the
    schedule's), finish the folder as a single process does, and rename it."""
    factors: dict[str, dict[int, np.ndarray]] = {}
    digests: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for rank in range(group.size):
        tensors, report = _part(tmp, rank)
        for key, array in load(tensors).items():
            module, index = key.rsplit("|", 1)
            if index == "digest":
                digests[module] = array
            else:
                factors.setdefault(module, {})[int(index)] = array
        part = json.loads(report.read_text())
        entries.update(part["entries"])
        for module in part["modules"]:
            factors.setdefault(module, {})
        tensors.unlink()
        report.unlink()
    order = [name[: -len(".weight")] for step in job.steps for name in step]
    job.factors = {m: tuple(factors[m][i] for i in sorted(factors[m])) for m in order if m in factors}
    job.digests = {m: (digests[m],) for m in order if m in digests}
    job.entries = {m: entries[m] for m in order if m in entries}
    if len(job.factors) != len(job.targets):
        raise RuntimeError(f"{len(job.targets) - len(job.factors)} targets were decomposed by no rank")
    hf.PlacedModelWriter.finish(tmp, layout)
    job.finish(tmp)
    hf.publish(tmp, job.out)

