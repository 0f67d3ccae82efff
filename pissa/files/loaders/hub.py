"""Hugging Face Hub ids ("org/name"): the local cache first, then a download of the files pissa reads.

huggingface_hub does the work, so its conventions hold as they do for transformers and mlx-lm:
HF_HOME / HF_HUB_CACHE choose the cache, HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids the
network, HF_TOKEN or `hf auth login` opens gated models, HF_ENDPOINT picks a mirror, and its own
progress bars show a download. It is imported only when an id reaches it, so a local model never
pays for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pissa.errors import PissaError
from pissa.files.loaders.hf import INDEX, TOKENIZER_FILES

# What pissa reads and what transformers and mlx-lm need to load the folder: the config, the
# safetensors weights under transformers' names (one file, or the index and its shards), the
# tokenizer files pissa copies, and the adapter of a pissa init folder (the official PiSSA models
# keep one in pissa_init/). Not the .bin / .pth / .onnx / .gguf duplicates many repos also carry.
FILES = ("config.json", "generation_config.json", "model.safetensors", INDEX, "model-*.safetensors",
         *TOKENIZER_FILES, "pissa_init/*")


def looks_like_id(model: str) -> bool:
    """Whether a model argument that names nothing on disk is meant as a Hub id: "org/name",
    not a path ("./x/y", "/x", "~/x", "a/b/c")."""
    return model.count("/") == 1 and "\\" not in model and not model.startswith((".", "/", "~"))


def _one_line(e: Exception) -> str:
    # huggingface_hub's messages span lines (URL, request id, advice); the CLI prints one.
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _has_model(path: Path, require: str | None = None) -> bool:
    """config.json plus complete safetensors weights (and `require`, when given): what a download
    must leave behind."""
    if not (path / "config.json").is_file() or (require and not (path / require).exists()):
        return False
    if (path / INDEX).is_file():
        try:
            shards = set(json.loads((path / INDEX).read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False  # a broken index: download again (online) or let HFSource name the problem
        return bool(shards) and all((path / s).is_file() for s in shards)
    return (path / "model.safetensors").is_file() or any(path.glob("model-*.safetensors"))


def _check_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PissaError(f"model {repo_id!r} is not a local file or folder, nor a valid Hugging Face Hub id "
                         f"({_one_line(e)}); pass a model folder, a .gguf file, or a Hub id (org/name)") from None


def cached(repo_id: str, require: str | None = None) -> Path | None:
    """The cached snapshot of a Hub model (its "main" revision) when it holds a config, complete
    weights and `require` (a file or folder name, when given), else None. Never touches the network."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _check_id(repo_id)
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(FILES), local_files_only=True))
    except LocalEntryNotFoundError:  # not cached, or (newer huggingface_hub) a snapshot known to be partial
        return None
    return path if _has_model(path, require) else None


def snapshot(repo_id: str, require: str | None = None) -> Path:
    """The local folder of a Hub model: the cached snapshot when it is complete, else a download of
    FILES into the cache (only what is missing), with huggingface_hub's progress bars on stderr
    (HF_HUB_DISABLE_PROGRESS_BARS=1 hides them). `require` (e.g. "pissa_init") must be there too.

    Raises:
        PissaError: a malformed id; offline (HF_HUB_OFFLINE) with the model not in the cache; the
            Hub unreachable; no such model (or a private one without a token); a gated model; or
            a model without safetensors weights. The message names the id and the cache folder.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    found = cached(repo_id, require)
    if found is not None:
        return found
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise PissaError(f"model {repo_id!r} is not in the Hugging Face cache {cache} (or only in part) and "
                         "downloads are off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE); download it with the network "
                         "on, point HF_HUB_CACHE or HF_HOME at a cache that has it, or pass a local model folder")
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(FILES)))
    except GatedRepoError:
        raise PissaError(f"model {repo_id!r} is gated on the Hugging Face Hub: accept its terms at "
                         f"{constants.ENDPOINT}/{repo_id}, then log in (hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PissaError(f"model {repo_id!r} not found: no such local file or folder, and no such model on the "
                         "Hugging Face Hub (if it is private, log in with hf auth login or set HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:  # the Hub did not answer and the cache has nothing
        raise PissaError(f"cannot reach the Hugging Face Hub for {repo_id!r} ({_one_line(e)}) and it is not in "
                         f"the cache {cache}; check the network, or pass a local model folder") from None
    except (OSError, _transport_error()) as e:  # other HTTP errors, a full disk, a dropped connection
        raise PissaError(f"downloading {repo_id!r} into {cache} failed ({_one_line(e)}); run the command again "
                         "to resume it") from None
    if not _has_model(path, require):
        raise PissaError(f"model {repo_id!r} on the Hugging Face Hub has no config.json with safetensors weights "
                         f"(model.safetensors or {INDEX} and its shards){' and ' + require if require else ''}, "
                         "which pissa reads; for a GGUF repo, download one .gguf file (hf download REPO FILE.gguf) "
                         "and pass its path")
    # Said after, not before: a refusal stays one line.
    print(f"pissa: downloaded {repo_id} from the Hugging Face Hub into {path}", file=sys.stderr)
    return path


def has_file(repo_id: str, filename: str) -> bool:
    """Whether the Hub lists `filename` in the model (False offline, or when the Hub does not answer)."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return bool(huggingface_hub.file_exists(repo_id, filename))
    except (OSError, ValueError, _transport_error()):
        return False


def _transport_error() -> type[Exception]:
    # huggingface_hub 1.x uses httpx, 2.x its fork httpx2; a connection lost mid-file surfaces as
    # that library's HTTPError, which is not an OSError.
    try:
        from httpx2 import HTTPError
    except ImportError:
        from httpx import HTTPError
    return HTTPError
