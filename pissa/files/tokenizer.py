"""A model folder's tokenizer (transformers' AutoTokenizer) and the token id its batches pad with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pissa.errors import PissaError


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    return pid if pid is not None else (tokenizer.eos_token_id or 0)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model folder's tokenizer, through transformers' AutoTokenizer.

    Raises:
        PissaError: when the folder holds no tokenizer files (a model saved without them, or a
            pissa init of such a model), or transformers cannot build a tokenizer from them.
    """
    from transformers import AutoTokenizer

    from pissa.files.loaders.hf import TOKENIZER_FILES

    model_dir = Path(model_dir)
    # Without any of these files transformers tries to convert a slow tokenizer it does not have
    # and ends in a ValueError several lines long.
    if model_dir.is_dir() and not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise PissaError(f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); copy "
                         "them from the model it was made from (pissa init copies whatever its input has)")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise PissaError(f"cannot load the tokenizer in {model_dir} ({first.strip()}); check its tokenizer files "
                         "or copy them from the original model") from None
