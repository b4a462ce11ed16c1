"""The lmms-eval models of this package, as the manifests that its `lmms_eval.models` entry points name.

The manifests are built on first access, not at import: importing lmms-eval's registry loads these entry points, so a
module that imported it at the top would be read half-initialised whenever it is imported before lmms-eval.
"""

from __future__ import annotations

from functools import cache
from typing import Any

MODELS = {  # attribute named by the entry point: (lmms-eval model id, class path)
    "LLAVA_OV_MANAGER": ("llava_ov_manager", "eval.model.LlavaOvManager"),
    "LLAVA_OV_MANAGER_REPLAY": ("llava_ov_manager_replay", "eval.replay.LoggedPredictions"),
}


@cache
def _manifest(name: str) -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    model_id, class_path = MODELS[name]
    return ModelManifest(model_id=model_id, simple_class_path=class_path)


def __getattr__(name: str) -> Any:
    if name not in MODELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _manifest(name)
