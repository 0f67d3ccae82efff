"""`pissa train --backend torch`: the framework half of a run, top to bottom.

AdamW, gradient checkpointing, the DDP / FSDP2 wrapping, and the three framework steps
pissa.training.loop asks for: a micro-batch's forward and backward, the clipped optimizer step,
and the optimizer state for checkpoints. Everything else (the launcher, device and precision,
data, schedule, accumulation, run folder, resume, NaN and Ctrl-C handling, evals, eval and save
cadence, the adapter it saves, the final adapter and LoRA) is the core's, shared with the MLX backend
(pissa.training.train, pissa.training.loop).

Under torchrun the model is wrapped for DDP (a replica per rank) or, with shard=True, split with
FSDP2's fully_shard (pissa_torch.dist); each rank runs its rows of every batch, and the loss is
scaled so that the reduced gradient is the one-process gradient of the global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from pissa.errors import PissaError
from pissa_torch import backend
from pissa_torch.dist import full_state, load_state, sync, wrap

STATE_FILE = "trainer.pt"  # a checkpoint's fp16 loss scaler state, beside optimizer.pt


COMPILER = "inductor"  # torch.compile's backend (tests use "aot_eager": the same tracing, without C++ builds)


def compile_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer in place (the attention within records stays eager: its
    buckets' shapes change from batch to batch; pissa_torch.attention). Shapes that change between
    batches are marked dynamic on the first recompile, so a run compiles each layer about twice.
    Returns how many layers were compiled.

    Raises:
        PissaError: a model whose decoder layers pissa cannot find.
    """
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise PissaError(f"--compile: cannot find the decoder layers of a {model.config.model_type} model; drop --compile")
    for layer in layers:
        layer.compile(backend=COMPILER)
    return len(layers)


class Trainer:
    """pissa.training.loop.Steps for one transformers model with its adapter layers."""

    def __init__(self, run, model: nn.Module, dev: torch.device, precision: str, shard: bool):
        cfg, group = run.cfg, run.group
        self.run, self.model, self.dev, self.precision, self.backend = run, model, dev, precision, backend
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.compile:
            compile_layers(model)
        model.config.use_cache = False
        model.train()
        with group.guard("wrapping the model"):
            self.net = wrap(model, group, dev, shard)
        self.params = [p for p in model.parameters() if p.requires_grad]  # after fully_shard: the sharded ones
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
        self.scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        if run.checkpoint is not None:
            load_state(self.opt, torch.load(run.checkpoint / "optimizer.pt", map_location=dev), self.params)
            extra = run.checkpoint / STATE_FILE  # absent from checkpoints pissa wrote before it kept them
            if extra.is_file() and self.scaler.is_enabled():
                self.scaler.load_state_dict(torch.load(extra, map_location="cpu")["scaler"])
        self.sharded = shard  # the loop cannot save on Ctrl-C what only all ranks together hold

    def forward_backward(self, batch, weight, draw, last):
        torch.manual_seed(draw)  # the dropout masks of this micro-batch
        with sync(self.net, last):  # the loop says which micro-batch ends the step
            total, _ = backend.token_loss_sum(self.net, backend.to_device(batch, self.dev), self.precision)
            # DDP and FSDP2 average over the ranks; the loop wants the sum.
            self.scaler.scale(total * (weight * self.run.group.size)).backward()
        return total.detach()  # on the device: the loop reads it when it logs, not here

    def update(self, lr):
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, self.run.cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def save_state(self, folder):
        state = full_state(self.opt) if self.sharded else self.opt.state_dict()
        if folder is not None:
            torch.save(state, folder / "optimizer.pt")
            if self.scaler.is_enabled():  # fp16's loss scale and growth tracker: a fresh one would drift
                torch.save({"scaler": self.scaler.state_dict()}, folder / STATE_FILE)
