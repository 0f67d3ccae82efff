"""`pissa convert`, for every adapter kind: each kind (pissa.adapters.kinds) says what its exact
LoRA is, or why it has none; this module dispatches on the kind, and says where the result is
served: vLLM's --max-lora-rank for a PEFT folder, the base model's architecture for llama.cpp's
LoRA GGUF (pissa.files.formats.gguf_lora).
"""

from __future__ import annotations

import json
from pathlib import Path

from pissa.adapters.adapter import Adapter
from pissa.adapters.kinds.lora import QuantizedBaseWarning, quantized_base_note  # noqa: F401  (public names)
from pissa.adapters.kinds.lora import to_lora as pissa_to_lora  # noqa: F401  (PiSSA -> rank-2r LoRA)
from pissa.errors import PissaError

# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py; 16 is its default).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def to_lora(initial: Adapter | None, trained: Adapter) -> Adapter:
    """The plain LoRA that turns the model the adapter was initialised from into the trained model.

    Args:
        initial: the pissa_init adapter (the LoRA-shaped kind needs it; MoRA starts at zero and
            does not).
        trained: the trained adapter.

    Raises:
        PissaError: when the kind has no exact LoRA form (rotation MoRA, DoRA, full fine-tuning:
            the message also says that vLLM and llama.cpp serve plain LoRAs only), or `initial`
            does not match `trained`.
    """
    kind = trained.spec.kind_module
    try:
        return kind.to_lora(initial, trained)
    except PissaError as e:
        if kind.converts(trained.spec):
            raise
        raise PissaError(f"{e}; vLLM and llama.cpp serve plain LoRA adapters only, so serve the merged model "
                         "(a .gguf --out for llama.cpp, Ollama and LM Studio)") from None


def vllm_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`, or None above its largest (512)."""
    return next((n for n in VLLM_RANKS if n >= rank), None)


def vllm_line(lora: Adapter, out: str | Path) -> str:
    """What vLLM needs to serve the PEFT folder `out` holding `lora`, as one line."""
    rank = max(lora.spec.for_module(m).rank for m in lora.factors)  # the largest of a rank_pattern
    n = vllm_rank(rank)
    if n is None:
        return (f"vLLM: rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); serve the "
                "merged model instead (pissa merge)")
    return f"vLLM: vllm serve BASE_MODEL --enable-lora --lora-modules pissa={out} --max-lora-rank {n}"


def base_config(model: str | None, initial: str | Path | None, trained: str | Path) -> dict:
    """The config of the model a LoRA GGUF is for (its architecture and heads): MODEL when given (a
    folder, a .gguf, a Hub id), else the pissa init folder of --initial, else the one the run of
    --trained recorded (RUN_DIR/config.json).

    Raises:
        PissaError: when none of them names a readable model.
    """
    from pissa.files.loaders import open_model

    if model is None and initial is not None:
        model = str(Path(initial).parent)
    if model is None:
        run = Path(trained).parent / "config.json"
        model = json.loads(run.read_text()).get("model_dir") if run.is_file() else None
    if model is None:
        raise PissaError("a GGUF LoRA needs its base model's architecture: pass --model MODEL (the model folder or "
                         ".gguf the LoRA runs on)")
    return open_model(str(model)).config


def gguf_lora(initial: str | Path | None, trained_dir: str | Path, out: str | Path, *, gguf_type: str = "f32",
              model: str | None = None, base: str = "original", force: bool = False) -> Adapter:
    """`pissa convert --format gguf`: write llama.cpp's LoRA file at `out` and return the LoRA written.

    Args:
        initial, trained_dir: the adapters' folders, as for to_lora.
        gguf_type: f32 (default, as llama.cpp's converter), f16, bf16 or q8_0.
        model: the model whose config gives the architecture (see base_config).
        base: "original": the converted LoRA, for the original model's GGUF (what users have);
            "residual": the trained adapter itself, for a GGUF of the residual model.
        force: replace an existing non-empty file.

    Raises:
        PissaError: as to_lora and pissa.files.formats.gguf_lora.save_lora_gguf (which refuses a
            --base residual adapter that is not a LoRA); an existing output without force. Nothing
            is written then.
    """
    from pissa.files.formats.gguf_lora import save_lora_gguf
    from pissa.files.formats.gguf_write import check_out_file, qtype
    from pissa.files.formats.peft import load_adapter

    check_out_file(Path(out).absolute(), force)
    qtype(gguf_type)
    if base not in ("original", "residual"):
        raise PissaError(f"unknown --base {base!r}; choose original or residual")
    trained = load_adapter(trained_dir)
    # --base residual: the trained adapter as it is (save_lora_gguf refuses a kind that is not a LoRA).
    lora = trained if base == "residual" else to_lora(load_adapter(initial) if initial else None, trained)
    save_lora_gguf(out, lora, base_config(model, initial, trained_dir), gguf_type, force)
    return lora
