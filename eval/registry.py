"""The lmms-eval models of this package, as the manifests that its `lmms_eval.models` entry points name."""

from lmms_eval.models.registry_v2 import ModelManifest

LLAVA_OV_MANAGER = ModelManifest(model_id="llava_ov_manager", simple_class_path="eval.model.LlavaOvManager")
LLAVA_OV_MANAGER_REPLAY = ModelManifest(
    model_id="llava_ov_manager_replay", simple_class_path="eval.replay.LoggedPredictions"
)
