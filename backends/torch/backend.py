"""pissa_torch's Backend (pissa.numeric.backend): the PyTorch primitives the shared driver calls,
for transformers models on CUDA or the CPU. Module paths are transformers' own, which are PEFT's."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
import torch
from torch import nn

from pissa.errors import PissaError
from pissa.files import packable
from pissa.numeric.loss import IGNORE
from pissa_torch.layers.base import AdapterLinear, dense_weight, weight_shape  # noqa: F401  (Backend members)
from pissa_torch import attention, loss, quantized
from pissa_torch.quantized import AffineQuantLinear, is_quantized  # noqa: F401  (a Backend member)

name = "torch"
launcher = "torchrun"
shards = True  # --shard: FSDP2 (pissa_torch.dist)
qpissa_scheme = "nf4"  # what `pissa compare` and the error messages use for QPiSSA here
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------- arrays and devices
def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 becomes ml_dtypes.bfloat16 (numpy has no bfloat16 of its own).
    A parameter sharded by FSDP2 (a DTensor) is gathered whole first: every rank must call this."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def detach(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def from_numpy(a: np.ndarray, like: nn.Module | None = None) -> torch.Tensor:
    """A tensor that owns a copy of `a` (never torch.from_numpy's shared memory: training would
    then rewrite the caller's arrays, the initial adapter, in place). With `like`, a base module,
    it is the parameter of an adapter on that base: float32 (float64 on a float64 base), as master
    weights are, on the base's device."""
    a = np.array(a, copy=True, order="C")
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == ml_dtypes.bfloat16 else torch.from_numpy(a)
    if like is None:
        return t
    weight = like.weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return t.to(weight.device, dtype)


def device(name: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """cuda when available, else cpu (None); under a launcher, rank local_rank's GPU."""
    if isinstance(name, torch.device):
        return name
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PissaError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise PissaError(f"unknown torch device {name!r} ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and dev.index is None and local_rank:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def accelerator(dev: torch.device) -> tuple[bool, bool]:
    return dev.type == "cuda", dev.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(precision: str, dev: torch.device):
    """bf16 (or fp16) autocast for the frozen model's matmuls; nothing at fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=_DTYPES[precision])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------- models and layers
def load_base(model_dir: str | Path, device: torch.device | None = None, precision: str = "fp32") -> nn.Module:
    """The folder's transformers model (pissa_torch.quantized.load_base: plain, nf4 or affine) on
    `device`, its weights loaded straight into the precision's dtype (transformers casts tensor by
    tensor, so a bf16 checkpoint under bf16 precision is never upcast): bfloat16 or float16 frozen
    weights under bf16 or fp16 precision, as PEFT users load a model. A quantised residual keeps
    its storage. The adapter's parameters are float32 master weights whatever this dtype
    (from_numpy), and autocast runs the matmuls in the precision's dtype."""
    return quantized.load_base(model_dir, dtype=_DTYPES[precision], device=device)


def targets(model: nn.Module, spec) -> dict[str, nn.Module]:
    # nn.Linear covers bitsandbytes' Linear4bit, a subclass; Conv1D is GPT-2's linear layer.
    from transformers.pytorch_utils import Conv1D

    found = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, AffineQuantLinear, Conv1D)) and spec.matches(n)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec.targets == "all-linear" and output is not None:
        found = {n: m for n, m in found.items() if m is not output}
    if not found:
        raise PissaError(f"targets {spec.describe_targets()} match no nn.Linear of this model; "
                         "use all-linear or module names such as q_proj,v_proj")
    return found


def read_weight(base: nn.Module) -> np.ndarray:
    return to_numpy(dense_weight(base).float())


@torch.no_grad()
def write_weight(base: nn.Module, weight: np.ndarray) -> None:
    w = dense_weight(base)  # [out, in], a view of a Conv1D's [in, out] weight: the copy reaches it
    w.copy_(from_numpy(weight).to(w.dtype))


def layer(kind: str) -> type[AdapterLinear]:
    return importlib.import_module(f"pissa_torch.layers.{kind}").LAYER


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    for path, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield path, module


def replace(model: nn.Module, layers) -> None:
    for path, new in layers:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def freeze(model: nn.Module) -> None:
    # Each layer names its own trainable parameters; nothing is matched by name suffix.
    model.requires_grad_(False)
    for _, adapter in adapter_layers(model):
        for p in adapter.params():
            p.requires_grad_(True)


# ---------------------------------------------------------------------- forward passes
# transformers packs from position_ids for the architectures both backends have checked.
unpackable = packable.unpackable


def to_device(batch: dict[str, np.ndarray], dev: torch.device) -> dict:
    """A collated batch (pissa.training.batches.collate_rows) on the device, with what the host
    knows of it for the loss: "picks" (flat indices into [b * (t - 1)] of the positions whose next
    token is labelled), "targets" (those tokens), "count" (how many, a Python int), and "records"
    (where each record lies, a packed row's several or an unpacked row's one, and their position
    ids: pissa_torch.attention.DeviceLayout). Made before the step, so that nothing in it waits
    for the device."""
    out: dict = {k: torch.from_numpy(v).to(dev, non_blocking=True) for k, v in batch.items()}
    following = batch["labels"][:, 1:].reshape(-1)
    picks = np.flatnonzero(following != IGNORE)
    out.update(picks=torch.from_numpy(picks).to(dev, non_blocking=True), count=len(picks),
               targets=torch.from_numpy(following[picks]).to(dev, non_blocking=True))
    # an unpacked batch's rows are right-padded records, one a row
    b, t = batch["input_ids"].shape
    segments = batch["segment_ids"] if "segment_ids" in batch else np.where(batch["attention_mask"] > 0, 0, -1)
    positions = batch["position_ids"] if "position_ids" in batch else np.broadcast_to(np.arange(t), (b, t))
    out["records"] = attention.DeviceLayout.of(segments, positions, dev)
    return out


def token_loss_sum(net: nn.Module, batch: dict, precision: str, rows: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the label tokens (position t predicts token t+1; 0 for a batch
    without labels), with gradients, as a 0-d tensor on the device (never read here), and their
    count. `net` is the model or its DDP wrapper (the forward goes through it, for its hooks);
    `batch` comes from to_device. A packed batch gives each example the loss it has alone, and only
    labelled positions reach the LM head, `rows` at a time (pissa_torch.loss)."""
    model = getattr(net, "module", net)  # DDP keeps the model in .module; FSDP2 shards it in place
    inputs = loss.model_inputs(model, batch)
    with autocast(precision, batch["input_ids"].device):
        total = loss.labelled_loss(net, model, inputs, batch, rows)
    return total, batch["count"]


@torch.no_grad()
def loss_sum(model: nn.Module, batch: dict[str, np.ndarray], precision: str) -> tuple[float, int]:
    total, n = token_loss_sum(model, to_device(batch, _device_of(model)), precision)
    return float(total), n


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, np.ndarray], precision: str) -> torch.Tensor:
    # A packed batch gets each example's own logits here too, at the example's positions in its row.
    b = to_device(batch, _device_of(model))
    with autocast(precision, b["input_ids"].device):
        z = model(**loss.model_inputs(model, b)).logits
    return z[:, :-1].float()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, stops: set[int]) -> list[str]:
    """Greedy completions through transformers' generate (left-padded batch; its own stop ids
    from the generation config)."""
    from pissa.files.tokenizer import pad_id

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(_device_of(model))
    tokenizer.padding_side = old_side
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def trainer(run, model: nn.Module, dev: torch.device, precision: str, shard: bool):
    from pissa_torch.train import Trainer

    return Trainer(run, model, dev, precision, shard)
