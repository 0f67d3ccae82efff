"""pissa_torch.load(): the core's load, with a model that transformers' Trainer (and the trainers
built on it, such as TRL's) trains and saves as it trains and saves a PEFT model.

Two things stand between the Trainer and a model with pissa's layers, and both are settled on the
model itself, so a user's script needs nothing beyond load():
- the Trainer refuses a quantised model (QPiSSA's nf4 residual) unless adapters are attached, which
  it reads from transformers' `_hf_peft_config_loaded` flag; pissa's adapters are attached, so
  load() sets it;
- the Trainer saves (each checkpoint-N/, and save_model) through model.save_pretrained, which would
  write the whole model under pissa's module names (".base.weight"), and cannot write an nf4 one
  at all. Like PeftModel's, this model's save_pretrained writes the adapter: the PEFT folder with
  pissa's init fingerprint, in float32 (the master weights, as pissa's own checkpoints keep them),
  so `pissa convert --trained OUT/checkpoint-N` works on it. Beside it, model.safetensors holds the
  same trainable parameters under the model's own names: what the Trainer's
  `resume_from_checkpoint` loads into a model that is not a PeftModel (load_state_dict, not
  strict), so a resumed run continues from the checkpoint's adapter.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from pissa.adapters.adapter import BASE_MODEL_INFO, Adapter, init_fingerprint
from pissa.adapters.model import adapter_of
from pissa.adapters.spec import AdapterSpec
from pissa.files import models
from pissa.files.formats import peft as peft_format
from pissa_torch import backend

_INHERITED = ("source", "shapes", *BASE_MODEL_INFO)  # what a trained adapter keeps of its init's info


def load(model_dir: str | Path, adapter: str | Path | Adapter | None = None, *, device: Any = None,
         precision: str = "fp32") -> tuple[Any, AdapterSpec]:
    """A pissa init folder (the residual model, or the unchanged base for MoRA and full
    fine-tuning) with an adapter (a folder, an Adapter, or by default MODEL_DIR/pissa_init), no
    SVD, ready for transformers' Trainer (see the module docstring). A QPiSSA folder loads with its
    quantised residuals.

    Returns:
        (model, spec): the transformers model with adapter layers, on `device`; only the adapter's
        parameters require grad.

    Raises:
        PissaError: a folder torch cannot load, or an adapter that does not fit it.
    """
    if not isinstance(adapter, Adapter):
        adapter = peft_format.load_adapter(adapter or Path(model_dir) / models.INIT_DIR)
    model, spec = models.load(backend, model_dir, adapter, device=device, precision=precision)
    model._hf_peft_config_loaded = True  # adapters are attached: transformers' Trainer takes a quantised base
    model.pissa_adapter = (spec, trained_info(adapter))
    model.save_pretrained = types.MethodType(_save_adapter, model)
    # What that model.safetensors leaves out on purpose: the Trainer then resumes from it without
    # listing every frozen weight as missing.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model._keys_to_ignore_on_save = [k for k in model.state_dict() if k not in trainable]
    return model, spec


def trained_info(start: Adapter) -> dict:
    """pissa_config.json's fields for an adapter trained from `start` (an init, or a trained adapter
    being trained on): role "trained" and the fingerprint of the init it descends from."""
    role = start.info.get("role", "pissa_init")  # an init PEFT wrote has no pissa_config.json
    fingerprint = init_fingerprint(start) if role == "pissa_init" else start.info.get("init_fingerprint")
    info = {"role": "trained", **{k: start.info[k] for k in _INHERITED if k in start.info}}
    return {**info, "init_fingerprint": fingerprint} if fingerprint else info


def _save_adapter(model, save_directory: str | Path, state_dict: dict | None = None, is_main_process: bool = True,
                  **kwargs) -> None:
    """save_pretrained of a loaded model: its adapter as a PEFT folder in `save_directory` (which
    the Trainer also fills with its own state). The other arguments are transformers' and unused."""
    if not is_main_process:
        return
    from safetensors.torch import save_file

    spec, info = model.pissa_adapter
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    peft_format.save_adapter(path, adapter_of(backend, model, spec, info, dtype="float32"))
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, path / "model.safetensors", metadata={"format": "pt"})
