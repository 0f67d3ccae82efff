"""`pissa eval --backend torch`: eval loss and greedy exact-match accuracy on a JSON-lines split."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pissa.training.data import eval_split, load_tokenizer, pad_id
from pissa.studies.scoring import exact_match
from pissa.files.loaders import model_folder
from pissa_torch.api import load
from pissa_torch.quantized import load_base
from pissa_torch.train import autocast_for, eval_loss, pick_device


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy completions of already-formatted prompts (left-padded batch)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = old_side
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def load_for_inference(model_dir: Path, adapter, dev):
    """A pissa init folder (with its pissa_init or the given adapter), or a plain model folder."""
    if adapter or (model_dir / "pissa_init").is_dir():
        model, _ = load(model_dir, adapter, device=str(dev))
    else:
        model = load_base(model_dir, dtype=torch.float32, device=dev)
    return model.eval()


def answer(model_dir: str | Path, prompt: str, *, adapter: str | Path | None = None, device: str | None = None,
           max_new_tokens: int = 64) -> str:
    """One greedy answer to a user message (formatted with the chat template when there is one)."""
    model_dir = model_folder(model_dir)  # a local folder or a Hub id; PissaError for anything else
    dev = pick_device(device)
    tokenizer = load_tokenizer(model_dir)  # before the model: fails fast without one
    model = load_for_inference(model_dir, adapter, dev)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return generate(model, tokenizer, [prompt], max_new_tokens, dev)[0].strip()


def evaluate(model_dir: str | Path, data: str | Path, *, adapter: str | Path | None = None,
             device: str | None = None, batch_size: int = 16, max_new_tokens: int = 64,
             max_seq_len: int = 512, limit: int | None = None, progress: bool = True) -> dict:
    """Loss on the completions and exact-match accuracy of greedy answers.

    model_dir (a folder or a Hugging Face Hub id, see pissa.files.loaders.model_folder) with
    adapter=None uses MODEL_DIR/pissa_init when it exists (a pissa init folder), else the plain model.
    """
    model_dir = model_folder(model_dir)
    dev = pick_device(device)
    tokenizer = load_tokenizer(model_dir)  # before the model: fails fast without one
    model = load_for_inference(model_dir, adapter, dev)
    pairs, dataset = eval_split(data, tokenizer, max_seq_len, limit)
    autocast, _ = autocast_for("auto", dev)
    loss = eval_loss(model, dataset, batch_size, pad_id(tokenizer), dev, autocast)
    correct, shown = 0, []
    with tqdm(total=len(pairs), desc="pissa eval (torch)", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            answers = generate(model, tokenizer, [c for c, _ in chunk], max_new_tokens, dev)
            for (_, ref), ans in zip(chunk, answers):
                correct += exact_match(ans, ref)
                if len(shown) < 3:
                    shown.append(ans.strip())
            bar.update(len(chunk))
    return {"n": len(pairs), "accuracy": correct / max(len(pairs), 1), "loss": loss, "examples": shown}
