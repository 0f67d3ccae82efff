"""The forward passes pissa.studies.forgetting needs, in MLX: per-row token log-likelihoods and the KL
divergence of a model's next-token distribution from a reference model's."""

from __future__ import annotations

import numpy as np

import mlx.core as mx
from pissa.training.data import IGNORE
from pissa.studies.forgetting import EXP_SAFE


def token_stats(model, batch: dict[str, np.ndarray], reference=None, device=None) -> tuple[np.ndarray, ...]:
    """For a collated batch (pissa.training.data.collate): per row, the summed negative log-likelihood of
    the labelled next tokens, the summed KL(p_reference || p_model) over the same positions (zeros
    without a reference), and the count of those positions.

    Batches are right-padded and attention is causal, so no mask is needed: a real token never
    sees a pad, and pads carry no label. With reference=model the KL is exactly zero. The KL is
    sum_v q_v d_v - log(sum_v p_v e^(d_v)), d = the logits' difference shifted to p-mean zero, or the plain
    difference of log-softmaxes where some d exceeds EXP_SAFE (see pissa_torch.measure)."""
    ids = mx.array(batch["input_ids"][:, :-1].astype(np.int32))
    labels = batch["labels"][:, 1:]
    keep = mx.array(labels != IGNORE)
    targets = mx.array(np.where(labels == IGNORE, 0, labels).astype(np.int32))

    def log_softmax(logits):
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    z = model(ids).astype(mx.float32)
    logp = log_softmax(z)
    nll = -(mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * keep).sum(axis=1)
    kl = mx.zeros_like(nll)
    if reference is not None:
        d = reference(ids).astype(mx.float32) - z
        logq = log_softmax(z + d)
        q, p = mx.exp(logq), mx.exp(logp)
        d = d - (p * d).sum(axis=-1, keepdims=True)  # as in pissa_torch.measure
        small = (q * d).sum(axis=-1) - mx.log1p((p * mx.expm1(mx.minimum(d, EXP_SAFE))).sum(axis=-1))
        large = (q * (logq - logp)).sum(axis=-1)
        per_position = mx.where(d.max(axis=-1) <= EXP_SAFE, small, large)
        kl = (per_position * keep).sum(axis=1)
    mx.eval(nll, kl)
    return (np.array(nll).astype(np.float64), np.array(kl).astype(np.float64),
            np.array(keep.sum(axis=1)).astype(np.int64))


class Scorer:
    """One model loaded for measuring (a pissa init folder with an adapter, or a plain model
    folder), in eval mode, with its tokenizer: what `pissa compare` evaluates at a checkpoint."""

    def __init__(self, model_dir, adapter=None, device: str | None = None):
        from pathlib import Path

        from transformers import AutoTokenizer

        from pissa_mlx.evaluate import load_for_inference, stop_ids
        from pissa_mlx.train import pick_device

        pick_device(device)
        self.model_dir = Path(model_dir)
        self.model = load_for_inference(self.model_dir, adapter)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.stops = stop_ids(self.model_dir, self.tokenizer)

    def token_stats(self, batch, reference: "Scorer | None" = None):
        return token_stats(self.model, batch, reference.model if reference else None)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from pissa_mlx.evaluate import generate

        return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.stops)
