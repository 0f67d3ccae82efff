"""The forward passes pissa.studies.forgetting needs, in torch: per-row token log-likelihoods and the KL
divergence of a model's next-token distribution from a reference model's."""

from __future__ import annotations

import numpy as np
import torch

from pissa.training.data import IGNORE
from pissa.studies.forgetting import EXP_SAFE


@torch.no_grad()
def token_stats(model, batch: dict[str, np.ndarray], reference=None, device="cpu") -> tuple[np.ndarray, ...]:
    """For a collated batch (pissa.training.data.collate): per row, the summed negative log-likelihood of
    the labelled next tokens, the summed KL(p_reference || p_model) over the same positions (zeros
    without a reference), and the count of those positions. float64 sums of float32 log-softmaxes.

    Both models see the same input; with reference=model the KL is exactly zero. The KL is taken
    as sum_v q_v d_v - log(sum_v p_v e^(d_v)), d = the logits' difference shifted to p-mean zero
    (so the sum is at least 1: log1p/expm1 form), not
    as a difference of two log-softmaxes: those carry the float32 rounding of the normaliser
    (~1e-6 at a 49k vocabulary), as large as a small KL itself. Where some d exceeds EXP_SAFE,
    e^d would overflow and the KL is large anyway: there it is the plain difference."""
    ids = torch.from_numpy(batch["input_ids"]).to(device)
    mask = torch.from_numpy(batch["attention_mask"]).to(device)
    labels = torch.from_numpy(batch["labels"][:, 1:]).to(device)
    keep = labels != IGNORE
    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(z, dim=-1)
    picked = torch.gather(logp, -1, labels.clamp(min=0)[..., None])[..., 0]
    nll = -(picked.double() * keep).sum(dim=1)
    kl = torch.zeros_like(nll)
    if reference is not None:
        d = reference(input_ids=ids, attention_mask=mask).logits[:, :-1].float() - z
        logq = torch.log_softmax(z + d, dim=-1)
        q, p = logq.exp(), logp.exp()
        d = d - (p * d).sum(-1, keepdim=True)  # the KL ignores a shift of d; this one makes sum p e^d >= 1
        small = (q * d).sum(-1) - torch.log1p((p * torch.expm1(d.clamp(max=EXP_SAFE))).sum(-1))
        large = (q * (logq - logp)).sum(-1)
        per_position = torch.where(d.amax(-1) <= EXP_SAFE, small, large)
        kl = (per_position.double() * keep).sum(dim=1)
    return nll.cpu().numpy(), kl.cpu().numpy(), keep.sum(dim=1).cpu().numpy()


class Scorer:
    """One model loaded for measuring (a pissa init folder with an adapter, or a plain model
    folder), in eval mode, with its tokenizer: what `pissa compare` evaluates at a checkpoint."""

    def __init__(self, model_dir, adapter=None, device: str | None = None):
        from pathlib import Path

        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from pissa_torch.evaluate import load_for_inference

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint measured is noise
        from pissa_torch.train import pick_device

        self.device = pick_device(device)
        self.model_dir = Path(model_dir)
        self.model = load_for_inference(self.model_dir, adapter, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)

    def token_stats(self, batch, reference: "Scorer | None" = None):
        return token_stats(self.model, batch, reference.model if reference else None, self.device)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from pissa_torch.evaluate import generate

        return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.device)
