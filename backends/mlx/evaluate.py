"""`pissa eval --backend mlx` and `pissa generate --backend mlx`: eval loss and greedy
exact-match accuracy on a JSON-lines split, and one greedy answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pissa_mlx.api import load, load_base
from pissa_mlx.train import eval_loss, pick_device
from tqdm.auto import tqdm

import mlx.core as mx
from mlx import nn
from pissa.data import eval_split, pad_id
from pissa.evaluate import exact_match


def stop_ids(model_dir: Path, tokenizer) -> set[int]:
    """EOS ids: the tokenizer's and generation_config.json's (an int or a list), as transformers'
    generate uses them."""
    ids = {tokenizer.eos_token_id} - {None}
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids


def greedy(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Greedy decoding with mlx-lm's KV cache; the new tokens, without the stop token."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array([prompt_ids])
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(mx.argmax(model(x, cache=cache)[0, -1]).item())
        if token in stops:
            break
        out.append(token)
        x = mx.array([[token]])
    return out


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, stops: set[int]) -> list[str]:
    """Greedy completions of already-formatted prompts, one at a time (mlx-lm models take no
    padding mask, so prompts are not batched)."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answers.append(tokenizer.decode(greedy(model, ids, max_new_tokens, stops), skip_special_tokens=True))
    return answers


def load_for_inference(model_dir: Path, adapter) -> nn.Module:
    """A pissa init folder (with its pissa_init or the given adapter), or a plain model folder."""
    if adapter or (model_dir / "pissa_init").is_dir():
        model, _ = load(model_dir, adapter)
    else:
        model = load_base(model_dir)
    model.eval()
    return model


def answer(model_dir: str | Path, prompt: str, *, adapter: str | Path | None = None, device: str | None = None,
           max_new_tokens: int = 64) -> str:
    """One greedy answer to a user message (formatted with the chat template when there is one)."""
    from transformers import AutoTokenizer

    pick_device(device)
    model_dir = Path(model_dir)
    model = load_for_inference(model_dir, adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return generate(model, tokenizer, [prompt], max_new_tokens, stop_ids(model_dir, tokenizer))[0].strip()


def evaluate(model_dir: str | Path, data: str | Path, *, adapter: str | Path | None = None,
             device: str | None = None, batch_size: int = 16, max_new_tokens: int = 64,
             max_seq_len: int = 512, limit: int | None = None, progress: bool = True) -> dict:
    """Loss on the completions and exact-match accuracy of greedy answers.

    model_dir with adapter=None uses MODEL_DIR/pissa_init when it exists (a pissa init folder),
    else the plain model.

    Returns:
        {"n", "accuracy", "loss", "examples"} (the first three answers), as the torch backend.
    """
    from transformers import AutoTokenizer

    pick_device(device)
    model_dir = Path(model_dir)
    model = load_for_inference(model_dir, adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, dataset = eval_split(data, tokenizer, max_seq_len, limit)
    loss = eval_loss(model, dataset, batch_size, pad_id(tokenizer), max_seq_len)
    model.eval()
    stops = stop_ids(model_dir, tokenizer)
    correct, shown = 0, []
    with tqdm(total=len(pairs), desc="pissa eval (mlx)", disable=not progress, file=sys.stderr) as bar:
        for context, ref in pairs:
            ans = generate(model, tokenizer, [context], max_new_tokens, stops)[0]
            correct += exact_match(ans, ref)
            if len(shown) < 3:
                shown.append(ans.strip())
            bar.update(1)
    return {"n": len(pairs), "accuracy": correct / max(len(pairs), 1), "loss": loss, "examples": shown}
