"""`pissa eval` and `pissa generate` on either backend, and the measurements `pissa compare` takes
of a checkpoint (Scorer), written once over the Backend protocol."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pissa.files.loaders import model_folder
from pissa.files.models import load_for_inference
from pissa.numeric.backend import get_backend, resolve_precision
from pissa.numeric.kl import kl_per_position, label_logprobs
from pissa.numeric.ops import get_ops
from pissa.studies.scoring import exact_match
from pissa.numeric.loss import IGNORE
from pissa.training.data import eval_split
from pissa.files.tokenizer import load_tokenizer, pad_id
from pissa.training.evaluation import eval_loss


def stop_ids(model_dir: Path, tokenizer) -> set[int]:
    """EOS ids: the tokenizer's and generation_config.json's (an int or a list), as transformers'
    generate uses them."""
    ids = {tokenizer.eos_token_id} - {None}
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids


class Session:
    """One model loaded for inference on one backend: a pissa init folder with its adapter (or
    another), or a plain model folder, in eval mode, with its tokenizer, device and precision."""

    def __init__(self, backend: str, model_dir: str | Path, adapter: str | Path | None = None,
                 device: str | None = None, precision: str = "auto"):
        self.backend = be = get_backend(backend)
        self.model_dir = model_folder(model_dir)  # a local folder or a Hub id; PissaError for anything else
        self.device = be.device(device)
        self.precision = resolve_precision(precision, *be.accelerator(self.device))
        self.tokenizer = load_tokenizer(self.model_dir)  # before the model: fails fast without one
        self.model = load_for_inference(be, self.model_dir, adapter, self.device, self.precision)
        self.stops = stop_ids(self.model_dir, self.tokenizer)
        self.ops = get_ops(be.name, str(self.device) if be.name == "torch" else None)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of already-formatted prompts."""
        return self.backend.generate(self.model, self.tokenizer, prompts, max_new_tokens, self.stops)

    def token_stats(self, batch: dict[str, np.ndarray], reference: "Session | None" = None) -> tuple[np.ndarray, ...]:
        """For a collated batch (pissa.training.data.collate): per row, the summed negative
        log-likelihood of the labelled next tokens, the summed KL(p_reference || p_model) over the
        same positions (zeros without a reference), and the count of those positions. The
        per-position values come from float32 logits (pissa.numeric.kl); the sums are float64."""
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        z = self.backend.logits(self.model, batch, self.precision)
        picked = label_logprobs(z, np.where(keep, labels, 0), self.ops)
        nll = -(picked.astype(np.float64) * keep).sum(axis=1)
        kl = np.zeros_like(nll)
        if reference is not None:
            z_ref = reference.backend.logits(reference.model, batch, reference.precision)
            kl = (kl_per_position(z_ref, z, self.ops).astype(np.float64) * keep).sum(axis=1)
        return nll, kl, keep.sum(axis=1)


def answer(backend: str, model_dir: str | Path, prompt: str, *, adapter: str | Path | None = None,
           device: str | None = None, max_new_tokens: int = 64) -> str:
    """One greedy answer to a user message (formatted with the chat template when there is one)."""
    s = Session(backend, model_dir, adapter, device)
    if getattr(s.tokenizer, "chat_template", None):
        prompt = s.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
    return s.generate([prompt], max_new_tokens)[0].strip()


def evaluate(backend: str, model_dir: str | Path, data: str | Path, *, adapter: str | Path | None = None,
             device: str | None = None, batch_size: int = 16, max_new_tokens: int = 64, max_seq_len: int = 512,
             limit: int | None = None, progress: bool = True, packing: bool = True) -> dict[str, Any]:
    """Loss on the completions and exact-match accuracy of greedy answers. The loss is taken on
    batches of `batch_size` rows, examples packed into rows of max_seq_len tokens (packing, where
    the backend packs the model exactly: the same loss, no compute on padding).

    model_dir (a folder or a Hugging Face Hub id, see pissa.files.loaders.model_folder) with
    adapter=None uses MODEL_DIR/pissa_init when it exists (a pissa init folder), else the plain model.

    Returns:
        {"n", "accuracy", "loss", "examples"} (the first three answers).
    """
    s = Session(backend, model_dir, adapter, device)
    pairs, dataset = eval_split(data, s.tokenizer, max_seq_len, limit)
    packed = packing and s.backend.unpackable(s.model_dir) is None
    loss = eval_loss(s.backend, s.model, dataset, batch_size, pad_id(s.tokenizer), s.precision,
                     max_seq_len if packed else None)
    correct, shown = 0, []
    with tqdm(total=len(pairs), desc=f"pissa eval ({s.backend.name})", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            answers = s.generate([context for context, _ in chunk], max_new_tokens)
            for ans, (_, ref) in zip(answers, chunk):
                correct += exact_match(ans, ref)
                if len(shown) < 3:
                    shown.append(ans.strip())
            bar.update(len(chunk))
    return {"n": len(pairs), "accuracy": correct / max(len(pairs), 1), "loss": loss, "examples": shown}
