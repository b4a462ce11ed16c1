"""Is a model argument a model? A local directory, or a hub id that the cache or the hub knows, checked at once.

HF's loaders take any string that is not a local directory for a hub id, so a mistyped path costs minutes of network
retries before an unrelated error. `check_model_reference` answers in a moment instead: a path-like value that does
not exist is "no such directory"; a hub id must be in the local cache, or (unless HF_HUB_OFFLINE is set) be found on
the hub by one short request.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .cli import UsageError

HUB_TIMEOUT_S = 3.0  # one look-up; a hub that does not answer in this time would not serve a download either
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_offline() -> bool:
    """Whether the user asked HF libraries to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_path(value: str) -> bool:
    """A value no hub id can be: absolute, `./`, `~`, several `/`, or whose first folder exists here."""
    if not _HUB_ID.match(value) or value.startswith((".", "~")) or Path(value).is_absolute():
        return True
    first, sep, _ = value.partition("/")
    return bool(sep) and Path(first).is_dir()


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or isinstance(
        try_to_load_from_cache(repo_id, "tokenizer_config.json"), str
    )


def _on_hub(repo_id: str, what: str) -> None:
    """Ask the hub whether `repo_id` exists; refuse it when it does not or the hub cannot be reached."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; the download will ask for access
    except RepositoryNotFoundError as error:
        raise UsageError(f"{what}{repo_id}: no such directory, and no model {repo_id!r} on the hub") from error
    except Exception as error:
        raise UsageError(
            f"{what}{repo_id}: no such directory, and the hub could not be reached to look for it "
            f"({type(error).__name__}); offline, give a local directory or set HF_HUB_OFFLINE=1 to use the cache"
        ) from error


def check_model_reference(value: str, what: str = "") -> None:
    """Raise `UsageError` unless `value` names a model directory or an available hub id (`what` prefixes the message,
    e.g. "--model_name_or_path ")."""
    path = Path(value).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"{what}{value}: not a directory (expected a model directory or a hub id)")
    if looks_like_path(value):
        raise UsageError(f"{what}{value}: no such directory")
    if _in_hub_cache(value):
        return
    if hub_offline():
        raise UsageError(f"{what}{value}: no such directory, and not a hub model in the local cache (HF_HUB_OFFLINE)")
    _on_hub(value, what)
