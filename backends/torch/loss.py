"""The loss of a collated batch on the torch backend: packed rows passed the way transformers packs
them, and only the labelled positions through the LM head, chunk by chunk.

Packing. transformers (5.x, masking_utils) reads packed sequences from position_ids when it gets no
2-D attention_mask and no cache: find_packed_sequence_indices starts a new sequence wherever a
position is not its predecessor + 1, and create_causal_mask / create_sliding_window_causal_mask
then AND the causal (or sliding-window) mask, taken over those positions, with "same sequence"
(packed_sequence_mask_function), in the masks sdpa and eager attention take. A packed row gets
a block-diagonal causal mask, sliding windows counted inside each example, and position
embeddings (RoPE or GPT-2's absolute ones) restarting at 0. The pads at a row's end continue the
last example's positions, so they join it as later tokens that no real token sees and no label
reads. The flash-attention mask takes the boundaries from position_ids only for a batch of one
row (modeling_flash_attention_utils._is_packed_sequence), so flash attention is refused here.
VERIFIED lists the architectures whose model code passes position_ids to those mask functions
and whose packed loss tests/backend_torch/test_packing.py checks against the examples alone;
Bloom and MPT, for one, build their masks without position_ids.

The head. The final hidden states are taken from the decoder's output (a forward hook, so that
the forward still runs through DDP's or FSDP2's wrapper and its hooks; transformers' own head
sees only the last position, logits_to_keep=1), the labelled positions gathered, and the LM head
and cross-entropy run over chunks of rows (HeadLoss): the [tokens x vocab] float32 logits never
exist at once. The gradient is computed chunk by chunk in the forward, as Liger's fused linear
cross-entropy does, and only d(loss)/d(hidden) [tokens x hidden] is kept for the backward.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pissa.errors import PissaError

# The model types packed exactly (tests/backend_torch/test_packing.py) and whose causal-LM class
# makes its logits as lm_head(h), then, for SOFTCAPPED, cap * tanh(logits / cap) with
# cap = config.final_logit_softcapping (modeling_gemma2.py, modeling_gemma3.py).
VERIFIED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2", "gemma3_text")
SOFTCAPPED = ("gemma2", "gemma3_text")
PACKING_ATTENTION = ("sdpa", "eager")  # the implementations whose masks transformers packs exactly, for any rows
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32 (341 rows of a 49152 vocabulary)


def unpackable(model_dir) -> str | None:
    """Why a packed batch would not give this folder's model the loss of its examples alone, or
    None when it does (the module docstring)."""
    path = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        return f"the torch backend cannot tell the architecture of {model_dir} ({e})"
    if model_type not in VERIFIED:
        return (f"the torch backend packs examples only for {', '.join(VERIFIED)}, whose attention masks it "
                f"has checked; {model_type} is not one of them")
    return None


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The forward's keyword arguments for a collated batch: packed (position_ids, no
    attention_mask, for transformers to build the block-diagonal mask from) when it has
    position_ids, else the padding mask. Never a cache: with one, transformers ignores packing.

    Raises:
        PissaError: a packed batch for a model whose attention would cross examples.
    """
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" not in batch:
        inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in PACKING_ATTENTION:
        raise PissaError(f"packed batches need sdpa or eager attention on the torch backend, and this model runs "
                         f"{attention}; train with --no-packing, or load it with sdpa")
    inputs["position_ids"] = batch["position_ids"]
    return inputs


def head_of(model: nn.Module) -> tuple[nn.Linear, float | None] | None:
    """(LM head, softcap or None) of a VERIFIED architecture whose head is a plain nn.Linear
    without bias; None for any other model, whose own forward then makes its logits."""
    head = model.get_output_embeddings()
    if model.config.model_type not in VERIFIED or type(head) is not nn.Linear or head.bias is not None:
        return None
    return head, model.config.final_logit_softcapping if model.config.model_type in SOFTCAPPED else None


def _final_hidden(net: nn.Module, model: nn.Module, head: nn.Linear, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last_hidden_state [b, t, hidden] of a forward through `net` (the model or
    its DDP wrapper), with transformers' head run on the last position only, and the head's
    weight as the forward saw it (FSDP2 gathers the root's weights for the forward and leaves them
    gathered until the backward; outside the forward the module holds its shard)."""
    seen = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, out: seen.append((out[0], head.weight)))
    try:
        net(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    return seen[-1]


def labelled_loss(net: nn.Module, model: nn.Module, inputs: dict, keep: torch.Tensor, targets: torch.Tensor,
                  rows: int | None = None) -> torch.Tensor:
    """The summed cross-entropy of the labelled positions `keep` [b, t - 1] (position t predicts
    token t + 1; targets [n] their labels) of a forward of `inputs` through `net` (the model, or
    its DDP wrapper: `model` is the model inside). Only those positions reach the LM head: in
    chunks of `rows` rows for a VERIFIED head (head_loss), else by the model's own head."""
    head = head_of(model)
    if head is not None:
        hidden, weight = _final_hidden(net, model, head[0], inputs)
        return head_loss(hidden[:, :-1][keep], weight, head[1], targets, rows)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        # A boolean mask: transformers returns those positions' logits only, flattened [n, vocab].
        logits = net(**inputs, logits_to_keep=F.pad(keep, (0, 1))).logits
    else:
        logits = net(**inputs).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, targets: torch.Tensor,
              rows: int | None = None) -> torch.Tensor:
    """sum_i cross_entropy(softcap(hidden_i @ weight.T), targets_i), over chunks of `rows` rows, in
    float32 (float64 for float64 hidden states); differentiable in hidden and weight (HeadLoss)
    where grad mode is on.

    hidden [n, h], weight [vocab, h], targets [n] (every one a label); cap: Gemma's softcap or None.
    """
    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return HeadLoss.apply(hidden, weight, cap, targets, rows)
    return _chunks(hidden, weight, cap, targets, rows, False, False)[0]


class HeadLoss(torch.autograd.Function):
    """head_loss with its gradient taken chunk by chunk in the forward; the backward scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, cap, targets, rows):
        total, d_hidden, d_weight = _chunks(hidden, weight, cap, targets, rows, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = None if d_hidden is None else (d_hidden * grad).to(d_hidden.dtype)
        d_weight = None if d_weight is None else (d_weight * grad).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None


def _chunks(hidden, weight, cap, targets, rows, want_hidden, want_weight):
    """(loss sum, d/d hidden or None, d/d weight or None). Each chunk's logits come from F.linear
    as the model's head makes them (in autocast's dtype under autocast), then go to float32; the
    gradient goes back through the same casts that autograd would take."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # the logits' dtype for the softmax: float32 at least
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if want_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_weight else None
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        out = F.linear(h, weight)
        z = out.to(dtype)
        if cap is not None:
            tanh = torch.tanh(z / cap)
            z = tanh * cap
        lse = torch.logsumexp(z, dim=-1)
        total += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
        if not (want_hidden or want_weight):
            continue
        g = z.sub_(lse[:, None]).exp_()  # softmax - onehot: d(lse - z_t)/dz, in z's memory
        g[torch.arange(len(t), device=g.device), t] -= 1
        if cap is not None:
            g.mul_(1 - tanh * tanh)  # d(cap * tanh(x / cap))/dx
        g = g.to(out.dtype)
        if want_hidden:
            d_hidden[start:start + rows] = g @ weight
        if want_weight:
            d_weight += g.T @ h
    return total, d_hidden, d_weight
