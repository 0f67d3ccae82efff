"""`pissa train --backend mlx`: the framework half of a run, top to bottom.

AdamW, the compiled micro-step (over pissa_mlx.loss) and update, gradient checkpointing, and the
three framework steps pissa.training.loop asks for: a micro-batch's forward and backward, the
clipped optimizer step, and the optimizer state for checkpoints. Everything else (the launcher,
device and precision, the model with its adapter, data, tokenisation, schedule, accumulation,
run folder, resume, NaN and Ctrl-C handling, evals, eval and save cadence, the adapter it saves,
the final adapter and LoRA) is the core's (pissa.training.train, pissa.training.loop), shared with
the torch backend, so both backends see the same batches in the same order and write the same
run folder.

Under mlx.launch the run is data-parallel as in mlx-lm: every rank holds the model, runs its rows
of each batch, and mlx.nn.average_gradients combines the gradients inside the compiled update.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from pissa_mlx import backend
from pissa_mlx.loss import token_loss_sum

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map
from pissa.errors import PissaError

OPTIMIZER_FILE = "optimizer.safetensors"


def compiled_steps(model: nn.Module, opt: optim.Optimizer, cfg, group: mx.distributed.Group | None = None):
    """(micro_step, update), both mx.compile'd.

    micro_step(batch, weight) -> (sum of token losses, weight * its gradient) for one micro-batch
    (batch: pissa_mlx.backend.to_arrays' arrays, packed or not; weight: an mx.array scalar, so one
    compiled graph serves every batch of the same shapes);
    update(grads) averages the accumulated gradients over `group`'s ranks (as mlx-lm does, once
    per step), clips them to max_grad_norm and takes an AdamW step.
    They read and update model.state and opt.state in place: never assign opt.state afterwards
    (that replaces the dict they hold). micro_step lists model.state among its outputs too,
    because nn.value_and_grad swaps the trainable arrays into the model while it traces.
    """
    def weighted(model, batch, weight):
        total, _ = token_loss_sum(model, batch)
        return total * weight, total

    loss_and_grad = nn.value_and_grad(model, weighted)
    state = [model.state, mx.random.state]

    @functools.partial(mx.compile, inputs=state, outputs=state)
    def micro_step(batch, weight):
        (_, total), grads = loss_and_grad(model, batch, weight)
        return total, grads

    @functools.partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])
    def update(grads):
        if group is not None and group.size() > 1:
            grads = nn.average_gradients(grads, group)
        grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        opt.update(model, grads)
        return norm

    return micro_step, update


def make_optimizer(cfg) -> optim.AdamW:
    """AdamW for a run's options (pissa.training.run.TrainConfig); the loop sets each step's
    learning rate (Trainer.update). bias_correction=True: the Adam of the paper and of
    torch.optim.AdamW (MLX defaults to off)."""
    return optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay, bias_correction=True)


def restore(state: dict, saved: dict[str, mx.array], where: Path) -> None:
    """Put a checkpoint's optimizer arrays ("model.layers.0.self_attn.q_proj.lora_A.m", "step",
    ...) into an initialised optimizer state, in place."""
    for name, value in saved.items():
        *parents, leaf = name.split(".")
        node = state
        try:
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if leaf not in node:
                raise KeyError(leaf)
        except (KeyError, IndexError, ValueError):
            raise PissaError(f"{where / OPTIMIZER_FILE}: {name} does not fit this model's adapter; "
                             "resume with the same model and adapter, or start over with --force") from None
        node[leaf] = value


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: each transformer block recomputes its activations in the backward
    pass (mx.checkpoint). Each block's class is swapped for a checkpointed subclass, so other
    models in the process are untouched (mlx-lm patches the block class itself)."""
    if not hasattr(model, "layers"):
        raise PissaError("--grad-checkpointing needs an mlx-lm model with transformer blocks (model.layers)")
    for block in model.layers:
        block.__class__ = _checkpointed(type(block))


@functools.cache
def _checkpointed(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return cls.__call__(self, *args, **kwargs)
        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


class Trainer:
    """pissa.training.loop.Steps for one mlx-lm model with its adapter layers: the compiled
    micro-step and update around AdamW, data-parallel under mlx.launch."""

    def __init__(self, run, model: nn.Module, dev: mx.Device, precision: str):
        cfg = run.cfg
        self.run, self.model, self.precision, self.backend = run, model, precision, backend
        if cfg.grad_checkpointing:
            checkpoint_blocks(model)
        model.train()
        self.opt = make_optimizer(cfg)
        self.opt.init(model.trainable_parameters())
        if run.checkpoint is not None:
            restore(self.opt.state, mx.load(str(run.checkpoint / OPTIMIZER_FILE)), run.checkpoint)
        self.micro_step, self.update_step = compiled_steps(model, self.opt, cfg, getattr(run.group, "group", None))
        self.grads = None
        self.sharded = False

    def forward_backward(self, batch, weight, draw, last):  # update() averages over the ranks, once a step
        mx.random.seed(draw)  # the dropout masks of this micro-batch (the compiled step reads the state)
        arrays = backend.to_arrays(batch, self.run.pad, self.run.cfg.max_seq_len)
        # average_gradients divides by the ranks; the loop wants their sum.
        total, g = self.micro_step(arrays, mx.array(weight * self.run.group.size, dtype=mx.float32))
        self.grads = g if self.grads is None else tree_map(mx.add, self.grads, g)
        mx.eval(total, self.grads)
        return total  # evaluated already: the loop reads it when it logs

    def update(self, lr):
        self.opt.learning_rate = lr
        self.update_step(self.grads)
        self.grads = None
        mx.eval(self.model.trainable_parameters(), self.opt.state)

    def save_state(self, folder):
        if folder is not None:
            mx.save_safetensors(str(folder / OPTIMIZER_FILE), dict(tree_flatten(self.opt.state)))
