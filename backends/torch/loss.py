"""The loss of a collated batch on the torch backend: packed rows passed the way transformers packs
them, and only the labelled positions through the LM head, chunk by chunk.

Packing. A packed batch runs attention within each record (pissa_torch.attention): its records
gathered by length into buckets on the host, never a row's [L, L] mask, with position embeddings
(RoPE or GPT-2's absolute ones) restarting at 0 per record. The pads at a row's end belong to no
record; no real token sees them and no label reads them. It needs the model to run sdpa or eager
attention (which pissa_torch.attention wraps); a model loaded with another is refused.
pissa.files.packable.PACKABLE lists the architectures whose model code hands its attention layers
what transformers gives them, and whose packed loss tests/backend_torch/test_packing.py checks
against the examples alone; Bloom and MPT, for one, compute attention their own way.

The head. The final hidden states are taken from the decoder's output (a forward hook, so that
the forward still runs through DDP's or FSDP2's wrapper and its hooks; transformers' own head
sees only the last position, logits_to_keep=1), the labelled positions gathered, and the LM head
and cross-entropy run over chunks of rows (HeadLoss): the [tokens x vocab] float32 logits never
exist at once. The gradient is computed chunk by chunk in the forward, as Liger's fused linear
cross-entropy does, and only d(loss)/d(hidden) [tokens x hidden] is kept for the backward.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from pissa.errors import PissaError
from pissa.files.packable import PACKABLE
from pissa.numeric.loss import IGNORE, chunk_rows
from pissa_torch import attention

# Of the packable model types (pissa.files.packable, each checked in tests/backend_torch/test_packing.py),
# whose causal-LM class makes its logits as lm_head(h), those that then apply cap * tanh(logits / cap)
# with cap = config.final_logit_softcapping (modeling_gemma2.py, modeling_gemma3.py).
SOFTCAPPED = ("gemma2", "gemma3_text")


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The forward's keyword arguments for a batch from pissa_torch.backend.to_device. A PACKABLE
    model running sdpa or eager attention gets its records (packed or not): attention within each
    record (pissa_torch.attention), position ids restarting at each record, and a placeholder mask,
    so transformers builds no mask and never waits for the device. Any other model gets the padding
    mask of unpacked rows. Never a cache: with one, transformers would take the row as one sequence.

    Raises:
        PissaError: packed rows for a model that is not PACKABLE or runs another attention.
    """
    inputs: dict = {"input_ids": batch["input_ids"], "use_cache": False}
    records = batch.get("records")
    packable = model.config.model_type in PACKABLE
    if records is not None and packable and attention.use_records(model):
        inputs.update(position_ids=records.positions, attention_mask=attention.placeholder(records.positions.device),
                      records=records)
        return inputs
    if "segment_ids" in batch:  # packed rows: only attention within each record keeps them apart
        if not packable:
            raise PissaError(f"the torch backend cannot pack examples for a {model.config.model_type} model "
                             "(pissa.files.packable); train it with --no-packing")
        raise PissaError(f"packed batches need sdpa or eager attention on the torch backend, and this model runs "
                         f"{model.config._attn_implementation}; train with --no-packing, or load it with sdpa")
    inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def head_of(model: nn.Module) -> tuple[nn.Linear, float | None] | None:
    """(LM head, softcap or None) of a PACKABLE architecture whose head is a plain nn.Linear
    without bias; None for any other model, whose own forward then makes its logits."""
    head = model.get_output_embeddings()
    if model.config.model_type not in PACKABLE or type(head) is not nn.Linear or head.bias is not None:
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


def labelled_loss(net: nn.Module, model: nn.Module, inputs: dict, batch: dict, rows: int | None = None) -> torch.Tensor:
    """The summed cross-entropy of a batch's labelled positions (position t predicts token t + 1;
    batch["picks"] their flat indices into [b * (t - 1)], batch["targets"] their labels, both made on
    the host) of a forward of `inputs` through `net` (the model, or its DDP wrapper: `model` is the
    model inside). Only those positions reach the LM head: in chunks of `rows` rows for a PACKABLE
    model's head (head_loss), gathered by index, so the host never waits for the device; any other
    model's own head makes their logits (by a boolean mask, which does wait)."""
    head = head_of(model)
    if head is not None:
        hidden, weight = _final_hidden(net, model, head[0], inputs)
        rows_of = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["picks"])
        return head_loss(rows_of, weight, head[1], batch["targets"], rows)
    keep = batch["labels"][:, 1:] != IGNORE
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        # A boolean mask: transformers returns those positions' logits only, flattened [n, vocab].
        logits = net(**inputs, logits_to_keep=F.pad(keep, (0, 1))).logits
    else:
        logits = net(**inputs).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), batch["targets"], reduction="sum")


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, targets: torch.Tensor,
              rows: int | None = None) -> torch.Tensor:
    """sum_i cross_entropy(softcap(hidden_i @ weight.T), targets_i), over chunks of `rows` rows, in
    float32 (float64 for float64 hidden states); differentiable in hidden and weight (HeadLoss)
    where grad mode is on.

    hidden [n, h], weight [vocab, h], targets [n] (every one a label); cap: Gemma's softcap or None.
    """
    rows = rows or chunk_rows(weight.shape[0])
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
