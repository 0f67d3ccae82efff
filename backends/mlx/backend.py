"""pissa_mlx's Backend (pissa.numeric.backend): the MLX primitives the shared driver calls, for
mlx-lm models on Apple silicon (and on the CPU elsewhere, with mlx[cpu]).

Module paths are mlx-lm's, which for Llama-family models are the Hugging Face ones
("model.layers.0.self_attn.q_proj"), so adapters use the same PEFT key names as the torch backend.
Where mlx-lm names a module otherwise (GPT-2: "model.h.0" for transformers' "transformer.h.0"),
targets and adapter layers are named by the Hugging Face path (pissa.files.layouts), and only
replace() speaks mlx-lm's.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten
from pissa.errors import PissaError
from pissa.files import packable
from pissa.numeric.records import record_layout
from pissa.files.layouts import from_mlx_lm_path, mlx_lm_path
from pissa.numeric.loss import IGNORE
from pissa_mlx.layers.base import AdapterLinear, weight_shape  # noqa: F401  (a Backend member)

name = "mlx"
launcher = "mlx.launch"
shards = False  # MLX trains data-parallel (mlx.nn.average_gradients), as mlx-lm does
qpissa_scheme = "affine4"  # MLX has no NF4
PAD_MULTIPLE = 32  # mx.compile traces once per input shape; rounding the width keeps shapes few
PICK_MULTIPLE = 128  # and the count of labelled positions too (picks_size)
_DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


# ---------------------------------------------------------------------- arrays and devices
def to_numpy(x: mx.array) -> np.ndarray:
    """A host numpy copy; bfloat16 becomes ml_dtypes.bfloat16 (numpy has no bfloat16 of its own)."""
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(x, copy=True)


def detach(x: mx.array) -> mx.array:
    return x  # MLX arrays carry no autograd history


def from_numpy(a: np.ndarray, like: nn.Module | None = None) -> mx.array:
    """An mx.array copy of `a` with its dtype (mx.array alone would turn float64 into float32).
    With `like`, a base module, it is the parameter of an adapter on that base: float32 master
    weights, whatever the base's dtype (its quantised words, its bf16 frozen weights)."""
    a = np.asarray(a)
    if like is not None:
        return mx.array(np.asarray(a, dtype=np.float32))
    return mx.array(a, dtype=mx.float64) if a.dtype == np.float64 else mx.array(a)


def device(name: str | mx.Device | None = None, local_rank: int = 0) -> mx.Device:
    """MLX's device for this run; "cpu" or "gpu" also becomes MLX's default device."""
    if isinstance(name, mx.Device):
        return name
    if name is None:
        return mx.default_device()
    if name not in ("cpu", "gpu"):
        raise PissaError(f"--device {name} is not an MLX device; use gpu or cpu")
    if name == "gpu" and not mx.metal.is_available():
        raise PissaError("--device gpu asked for, but MLX sees no GPU (Metal) here; use --device cpu")
    dev = mx.Device(mx.cpu if name == "cpu" else mx.gpu)
    mx.set_default_device(dev)
    return dev


def accelerator(dev: mx.Device) -> tuple[bool, bool]:
    """The GPU (Metal) has bfloat16; on the CPU MLX has no BLAS for it (a bf16 step was about
    10x slower than fp32 here)."""
    return dev.type == mx.gpu, True


# ---------------------------------------------------------------------- models and layers
def load_base(model_dir: str | Path, device: mx.Device | None = None, precision: str = "fp32") -> nn.Module:
    """The folder's model, built by mlx-lm (mlx_lm.utils.load_model), without an adapter; its
    floating-point weights in the precision's dtype, cast lazily tensor by tensor as they load (a
    bf16 checkpoint under bf16 precision is never upcast). A quantised layer (a QPiSSA residual)
    keeps its storage: its codes, scales and biases stay as written.

    Raises:
        PissaError: a folder that is not a model mlx-lm reads.
    """
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(Path(model_dir), lazy=True)
    except (FileNotFoundError, ValueError) as e:
        raise PissaError(f"mlx-lm cannot load {model_dir} ({e})") from None
    dtype = _DTYPES[precision]
    quantized = {path for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    cast = [(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype and k.rpartition(".")[0] not in quantized]
    model.update(tree_unflatten(cast))
    mx.eval(model.parameters())
    return model


def _paths(model: nn.Module):
    model_type = getattr(model, "model_type", None)
    return (lambda path: from_mlx_lm_path(model_type, path)), (lambda path: mlx_lm_path(model_type, path))


def targets(model: nn.Module, spec) -> dict[str, nn.Module]:
    ours, _ = _paths(model)
    found = {ours(n): m for n, m in model.named_modules()
             if n and isinstance(m, (nn.Linear, nn.QuantizedLinear)) and spec.matches(ours(n))}
    if not found:
        raise PissaError(f"targets {spec.describe_targets()} match no nn.Linear of this model; "
                         "use all-linear or module names such as q_proj,v_proj")
    return found


def is_quantized(base: nn.Module) -> bool:
    return isinstance(base, nn.QuantizedLinear)


def read_weight(base: nn.Module) -> np.ndarray:
    return to_numpy(base.weight.astype(mx.float32))


def write_weight(base: nn.Module, weight: np.ndarray) -> None:
    base.weight = from_numpy(weight).astype(base.weight.dtype)


def layer(kind: str) -> type[AdapterLinear]:
    return importlib.import_module(f"pissa_mlx.layers.{kind}").LAYER


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    ours, _ = _paths(model)
    for path, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield ours(path), module


def replace(model: nn.Module, layers) -> None:
    _, theirs = _paths(model)
    model.update_modules(tree_unflatten([(theirs(path), new) for path, new in layers]))


def freeze(model: nn.Module) -> None:
    # Each layer names its own trainable parameters; nothing is matched by name suffix.
    model.freeze()
    for _, adapter in adapter_layers(model):
        adapter.unfreeze_params()
    mx.eval(model.parameters())


# ---------------------------------------------------------------------- forward passes
# pissa_mlx.packing runs packed rows exactly for the architectures both backends have checked.
unpackable = packable.unpackable


def picks_size(n: int) -> int:
    """The padded count of labelled positions a batch carries: n rounded up to an eighth of its
    power of two (at least PICK_MULTIPLE), so that mx.compile sees few shapes (8 an octave) and
    at most 1/8 of the head's rows are padding."""
    step = max(PICK_MULTIPLE, (1 << max(n, 1).bit_length() - 1) // 8)
    return max(step, -(-n // step) * step)


def to_arrays(batch: dict[str, np.ndarray], pad: int, max_len: int = 0) -> dict[str, mx.array]:
    """The arrays pissa_mlx.loss.token_loss_sum reads, from a collated batch
    (pissa.training.batches.collate_rows): rows right-padded to a multiple of PAD_MULTIPLE (at
    most max(max_len, width) when max_len is given) so that mx.compile sees few distinct shapes.

    Returns "inputs" [b, t - 1] int32 (a row's last token predicts nothing and is not fed),
    "picks" [k] (flat indices into [b, t - 1] of the positions whose next token is labelled, k =
    picks_size(their count), the padding pointing at position 0), "targets" [k] (those next tokens,
    IGNORE on the padding), and for packed rows "segments" and "positions" [b, t - 1] (-1 and
    counting on), "buckets" and "inverse" (the records' layout, pissa.numeric.records). The extra
    pads change nothing: they come after every real token and carry no label."""
    width = batch["input_ids"].shape[1]
    target = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    if max_len:
        target = min(target, max(max_len, width))
    extra = ((0, 0), (0, target - width))
    ids = np.pad(batch["input_ids"], extra, constant_values=pad)
    following = np.pad(batch["labels"], extra, constant_values=IGNORE)[:, 1:].reshape(-1)
    where = np.flatnonzero(following != IGNORE)
    picks = np.zeros(picks_size(len(where)), dtype=np.int32)
    targets = np.full(len(picks), IGNORE, dtype=np.int32)
    picks[:len(where)], targets[:len(where)] = where, following[where]
    out = {"inputs": mx.array(ids[:, :-1].astype(np.int32)), "picks": mx.array(picks), "targets": mx.array(targets)}
    if "segment_ids" in batch:
        positions = batch["position_ids"]
        more = positions[:, -1:] + 1 + np.arange(target - width)
        segments = np.pad(batch["segment_ids"], extra, constant_values=-1)[:, :-1]
        out["segments"] = mx.array(segments.astype(np.int32))
        out["positions"] = mx.array(np.concatenate([positions, more], axis=1)[:, :-1].astype(np.int32))
        out["buckets"], out["inverse"] = records(segments)
    return out


def records(segments: np.ndarray) -> tuple[list[mx.array], mx.array]:
    """(buckets, inverse) of a packed batch's segment ids [b, t]: where its records lie, for
    attention within each (pissa.numeric.records, pissa_mlx.packing.records_attention)."""
    layout = record_layout(segments)
    return [mx.array(g.astype(np.int32)) for g in layout.buckets], mx.array(layout.inverse.astype(np.int32))


def loss_sum(model: nn.Module, batch: dict[str, np.ndarray], precision: str) -> tuple[float, int]:
    from pissa_mlx.loss import token_loss_sum

    loss, n = token_loss_sum(model, to_arrays(batch, 0), for_grad=False)
    mx.eval(loss, n)
    return loss.item(), n.item()


def logits(model: nn.Module, batch: dict[str, np.ndarray], precision: str) -> mx.array:
    """Unpacked rows are right-padded and attention is causal, so they need no mask: a real token
    never sees a pad, and pads carry no label. Packed rows (with segment_ids) run with attention
    kept inside each example (pissa_mlx.packing). The last position, which predicts nothing, is
    not fed."""
    from pissa_mlx.packing import head_logits, hidden_states

    ids = mx.array(batch["input_ids"][:, :-1].astype(np.int32))
    if "segment_ids" in batch:
        segments, positions = (mx.array(batch[k][:, :-1].astype(np.int32)) for k in ("segment_ids", "position_ids"))
        z = head_logits(model, hidden_states(model, ids, segments, positions, records(batch["segment_ids"][:, :-1])))
    else:
        z = model(ids)
    z = z.astype(mx.float32)
    mx.eval(z)
    return z


def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, stops: set[int]) -> list[str]:
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in greedy(model, ids, max_new_tokens, stops)]


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


def trainer(run, model: nn.Module, dev: mx.Device, precision: str, shard: bool):
    from pissa_mlx.train import Trainer

    return Trainer(run, model, dev, precision)
