"""The forward passes pissa.forgetting needs, in torch: per-row token log-likelihoods and the KL
divergence of a model's next-token distribution from a reference model's."""

from __future__ import annotations

import numpy as np
import torch

from pissa.data import IGNORE


@torch.no_grad()
def token_stats(model, batch: dict[str, np.ndarray], reference=None, device="cpu") -> tuple[np.ndarray, ...]:
    """For a collated batch (pissa.data.collate): per row, the summed negative log-likelihood of
    the labelled next tokens, the summed KL(p_reference || p_model) over the same positions (zeros
    without a reference), and the count of those positions. float64 sums of float32 log-softmaxes.

    Both models see the same input; with reference=model the KL is exactly zero."""
    ids = torch.from_numpy(batch["input_ids"]).to(device)
    mask = torch.from_numpy(batch["attention_mask"]).to(device)
    labels = torch.from_numpy(batch["labels"][:, 1:]).to(device)
    keep = labels != IGNORE
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, -1, labels.clamp(min=0)[..., None])[..., 0]
    nll = -(picked.double() * keep).sum(dim=1)
    kl = torch.zeros_like(nll)
    if reference is not None:
        logq = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        per_position = (logq.exp() * (logq - logp)).sum(dim=-1)
        kl = (per_position.double() * keep).sum(dim=1)
    return nll.cpu().numpy(), kl.cpu().numpy(), keep.sum(dim=1).cpu().numpy()


class Scorer:
    """One model loaded for measuring (a pissa init folder with an adapter, or a plain model
    folder), in eval mode, with its tokenizer: what `pissa compare` evaluates at a checkpoint."""

    def __init__(self, model_dir, adapter=None, device: str | None = None):
        from pathlib import Path

        from transformers import AutoTokenizer

        from pissa_torch.evaluate import load_for_inference
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
