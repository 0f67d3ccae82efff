"""What a quantised init costs the model's function before any training: the KL per token of the
next-token distribution of the QPiSSA model (its quantised residual plus the adapter) from the
original model's, next to QLoRA's (the original weights quantised directly, B = 0), on the general
text that ships with pissa (pissa.studies.forgetting). `pissa init --quantize` prints it beside its
error table and keeps it in quant_report.json.

The nuclear-norm error of the report is per matrix; this is the whole model, through every layer
and the softmax, so it tells whether a smaller error is a better model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pissa.files.formats import hf
from pissa.files.loaders import open_model
from pissa.numeric import quant
from pissa.numeric.dtypes import np_dtype
from pissa.numeric.ops import available_backends
from pissa.studies import forgetting
from pissa.studies.evaluate import Session
from pissa.files.tokenizer import pad_id

TOKENS = 1024
# Above this many parameters `pissa init --quantize` skips the step-0 KL unless --kl asks for it:
# its two float32 models then take 8 GiB, which a 16 GB laptop running the init cannot spare.
MAX_PARAMS = 1_000_000_000


def reference_folders(model: str, folder: Path, targets: set[str], scheme: quant.QuantScheme,
                      dtype: str) -> tuple[Path, Path]:
    """(the original model, QLoRA's step-0 model) as float folders under `folder`, in one pass:
    QLoRA's targets are deq(Q(W)) of W rounded to the storage dtype, as QPiSSA's report quantises
    it (pissa.numeric.qpissa: error_qlora)."""
    source = open_model(model)
    shapes = source.shapes()
    orig, qlora = folder / "original", folder / "qlora"
    writers = []
    for path in (orig, qlora):
        path.mkdir(parents=True)
        writers.append(hf.ModelWriter(path, [(n, np.float32, s) for n, s in shapes.items()]))
    for name in shapes:
        W = np.asarray(source.get(name), dtype=np.float32)
        writers[0].write(name, W)
        if name[: -len(".weight")] in targets and name.endswith(".weight"):
            W = quant.dequantize(quant.quantize(W.astype(np_dtype(dtype)).astype(np.float32), scheme))
        writers[1].write(name, W.astype(np.float32))
    for path, writer in zip((orig, qlora), writers):
        writer.close()
        hf.write_json(path / "config.json", hf.model_config(source.config, "float32"))
        if source.generation_config:
            hf.write_json(path / "generation_config.json", source.generation_config)
        source.save_tokenizer(path)
    return orig, qlora


def kl_backend(preferred: str) -> str | None:
    """The backend that runs the models: the init's own, else torch, else mlx; None without one."""
    have = [b for b in available_backends() if b != "numpy"]
    return preferred if preferred in have else (have[0] if have else None)


def step0_kl(model: str, out: Path, targets: set[str], scheme: quant.QuantScheme, dtype: str, backend: str,
             tokens: int = TOKENS) -> dict:
    """{"tokens", "backend", "qpissa", "qlora"}: the mean KL(p_original || p_model) per token
    over `tokens` tokens of general text, for the QPiSSA folder `out` (with its pissa_init) and
    for QLoRA's step-0 model."""
    with tempfile.TemporaryDirectory(prefix="pissa-step0-") as tmp:
        orig, qlora = reference_folders(model, Path(tmp), targets, scheme, dtype)
        reference = Session(backend, orig)
        examples = forgetting.general_examples(reference.tokenizer, tokens)
        pad = pad_id(reference.tokenizer)
        result = {"tokens": sum(len(e.input_ids) - 1 for e in examples), "backend": backend}
        for key, folder in (("qlora", qlora), ("qpissa", out)):
            score = forgetting.GeneralScore()
            scorer = Session(backend, folder)
            for batch in forgetting.batches(examples, 4, pad):
                score.add(*scorer.token_stats(batch, reference))
            result[key] = score.metrics()["general_kl"]
            del scorer
    return result


def line(kl: dict) -> str:
    gain = 1 - kl["qpissa"] / kl["qlora"] if kl["qlora"] > 0 else 0.0
    return (f"step-0 KL per token from the original model ({kl['tokens']} tokens of general text, {kl['backend']}): "
            f"QPiSSA {kl['qpissa']:.4f}, QLoRA {kl['qlora']:.4f} ({100 * gain:.0f}% lower)")


def measure_init(job, folder: Path, force: bool = False) -> str:
    """The step-0 KL of a finished QPiSSA init folder (before its rename), added to its
    quant_report.json: what `pissa init --quantize` passes to pissa.jobs.init.run_init as `measure`.
    Skipped, with a line saying so, for a model of more than MAX_PARAMS parameters unless `force`:
    the measurement runs the original and the quantised model side by side in float32 (8 bytes
    per parameter), more than the init itself needs by far, on the laptop QPiSSA is meant to help."""
    from pissa.jobs.init import QUANT_REPORT

    params = sum(int(np.prod(s)) for s in job.shapes.values())
    if params > MAX_PARAMS and not force:
        return (f"step-0 KL not measured: the model has {params / 1e9:.1f}B parameters, and the measurement holds two "
                f"float32 copies of it ({8 * params / 2**30:.0f} GiB); pass --kl to measure it anyway")
    runner = kl_backend(job.backend)
    if runner is None:
        return "step-0 KL not measured: it needs the torch or MLX backend (pip install 'pissa[torch]')"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return "step-0 KL not measured: the model has no tokenizer to read the general text with"
    job.report["step0_kl"] = step0_kl(job.model, folder, job.targets, job.quantize, job.spec.dtype, runner)
    hf.write_json(folder / QUANT_REPORT, job.report)
    return line(job.report["step0_kl"])
