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
from pissa.training.data import eval_split, load_tokenizer, pad_id
from pissa.studies.scoring import exact_match
from pissa.files.loaders import model_folder


def stop_ids(model_dir: Path, tokenizer) -> set[int]:
    """EOS ids: the tokenizer's and generation_config.json's (an int or a list), as transformers'
    generate uses them."""
    ids = {tokenizer.eos_token_id} - {None}
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids


def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stops: set[int]) -> list[list[int]]:
    """Greedy decoding of a batch of token-id prompts with mlx-lm's KV caches; each row's new
    tokens, without its stop token.

    Prompts are left-padded into one batch, with a BatchKVCache per layer in place of the
    model's KVCache: it masks the pads and starts each row's positions at its first real token,
    so every row decodes as it would alone (16 SmolLM2 arithmetic prompts: the same 16 answers,
    5.8x faster than one at a time on the CPU). A model whose caches are not all plain KVCache
    (sliding windows, state-space layers) decodes one prompt at a time with its own caches."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    if len(prompts) > 1:
        if not all(type(c) is KVCache for c in cache):
            return [row for p in prompts for row in greedy(model, [p], max_new_tokens, stops)]
        cache = [BatchKVCache(pads) for _ in cache]
    x = mx.array([[0] * k + p for k, p in zip(pads, prompts)])
    out: list[list[int]] = [[] for _ in prompts]
    running = set(range(len(prompts)))
    for _ in range(max_new_tokens):
        tokens = mx.argmax(model(x, cache=cache)[:, -1], axis=-1).tolist()
        for i in list(running):
            if tokens[i] in stops:
                running.discard(i)
            else:
                out[i].append(tokens[i])
        if not running:
            break
        x = mx.array(tokens)[:, None]
    return out


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, stops: set[int]) -> list[str]:
    """Greedy completions of already-formatted prompts, decoded as one batch."""
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in greedy(model, ids, max_new_tokens, stops)]


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
    model_dir = model_folder(model_dir)  # a local folder or a Hub id; PissaError for anything else
    pick_device(device)
    tokenizer = load_tokenizer(model_dir)  # before the model: fails fast without one
    model = load_for_inference(model_dir, adapter)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return generate(model, tokenizer, [prompt], max_new_tokens, stop_ids(model_dir, tokenizer))[0].strip()


def evaluate(model_dir: str | Path, data: str | Path, *, adapter: str | Path | None = None,
             device: str | None = None, batch_size: int = 16, max_new_tokens: int = 64,
             max_seq_len: int = 512, limit: int | None = None, progress: bool = True) -> dict:
    """Loss on the completions and exact-match accuracy of greedy answers.

    model_dir (a folder or a Hugging Face Hub id, see pissa.files.loaders.model_folder) with
    adapter=None uses MODEL_DIR/pissa_init when it exists (a pissa init folder), else the plain model.

    Returns:
        {"n", "accuracy", "loss", "examples"} (the first three answers), as the torch backend.
    """
    model_dir = model_folder(model_dir)
    pick_device(device)
    tokenizer = load_tokenizer(model_dir)  # before the model: fails fast without one
    model = load_for_inference(model_dir, adapter)
    pairs, dataset = eval_split(data, tokenizer, max_seq_len, limit)
    loss = eval_loss(model, dataset, batch_size, pad_id(tokenizer), max_seq_len)
    model.eval()
    stops = stop_ids(model_dir, tokenizer)
    correct, shown = 0, []
    with tqdm(total=len(pairs), desc="pissa eval (mlx)", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            answers = generate(model, tokenizer, [context for context, _ in chunk], max_new_tokens, stops)
            for ans, (_, ref) in zip(answers, chunk):
                correct += exact_match(ans, ref)
                if len(shown) < 3:
                    shown.append(ans.strip())
            bar.update(len(chunk))
    return {"n": len(pairs), "accuracy": correct / max(len(pairs), 1), "loss": loss, "examples": shown}
