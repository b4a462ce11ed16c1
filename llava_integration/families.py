"""The LLaVA family in HF transformers: one entry per model family says where the manager's seams are.

The runtime (`runtime.py`) is one piece of code for every family; what differs is data and a few small functions:
which classes belong to the family, where the vision tower, the projector and the decoder layers sit, which config
fields name the main vision feature and its select strategy, how images are cut into crops and packed (none for
LLaVA-1.5, AnyRes for LLaVA-NeXT, AnyRes with `anyres_max` and square images for LLaVA-OneVision), what
`get_placeholder_mask` returns, and how video frames are pooled. Adding a family is one entry in `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoModel,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches as next_num_patches

from .features import patches_per_image
from .image_modes import SQUARE

# (model, per-image features `(crops, T, C)`, image sizes, newline `(C,)`, select strategy, image mode)
#   -> (per-image packed `(tokens, C)`, tokens per image)
PackFn = Callable[[nn.Module, list, torch.Tensor, torch.Tensor, str, str], tuple[list, torch.Tensor]]
# (model config, number of images, image sizes, images per sample or None, image mode) -> crops per image
CropsFn = Callable[[object, int, torch.Tensor | None, torch.Tensor | None, str], list[int]]
# (model, selected vision states of every frame `(frames, T, N, C_vision)`) -> `(frames, T', N, D)`
VideoFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelFamily:
    """Where one LLaVA family keeps what the manager uses. `name` is the family's HF `model_type`."""

    name: str
    model_class: type[nn.Module]  # the ...ForConditionalGeneration class
    inner_class: type[nn.Module]  # the ...Model class it wraps under `.model`
    crops: CropsFn
    pack: PackFn | None  # None: every crop's tokens as they are (LLaVA-1.5)
    placeholder_masks: tuple[str, ...]  # what `get_placeholder_mask` returns, in order
    video_frames: VideoFn | None = None  # None: the family takes no videos
    video_newline: bool = False  # one `image_newline` token closes each video (OneVision)
    square_images: bool = False  # `set_image_aspect_ratio(model, "square")` applies
    vision_tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    decoder_layers: str = "language_model.layers"
    feature_layer: str = "vision_feature_layer"  # config fields of the main feature and its select strategy
    select_strategy: str = "vision_feature_select_strategy"

    @property
    def videos(self) -> bool:
        return self.video_frames is not None

    def part(self, inner: nn.Module, name: str) -> nn.Module:
        """The module at `self.<name>` (e.g. "projector") inside the family's inner model."""
        return attrgetter(getattr(self, name))(inner)

    def packing(self, inner: nn.Module, strategy: str, image_mode: str | None) -> Callable | None:
        """HF's packing of the crops of this family's images in `image_mode`, as `features.packed_rows` takes it; None
        where each crop's tokens are the image's (LLaVA-1.5, OneVision's square images)."""
        if self.pack is None or (image_mode == SQUARE and self.square_images):
            return None
        return partial(self.pack, inner, strategy=strategy, image_mode=image_mode)


# -- crops and packing ----------------------------------------------------------------------------------------------
def one_crop_per_image(config, num_images: int, image_sizes, batch_num_images, image_mode: str) -> list[int]:
    """LLaVA-1.5: each image is one crop (its processor gives no image sizes)."""
    return [1] * num_images


def next_crops(config, num_images: int, image_sizes: torch.Tensor, batch_num_images, image_mode: str) -> list[int]:
    """LLaVA-NeXT: the base view plus the AnyRes grid of every image."""
    return [
        next_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) for size in image_sizes
    ]


def onevision_crops(
    config, num_images: int, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None, image_mode: str
) -> list[int]:
    """LLaVA-OneVision: square images, or the grid except for the images of multi-image samples."""
    return patches_per_image(config, image_sizes, batch_num_images, image_mode)


def next_pack(model, features, image_sizes, newline, strategy, image_mode):
    """HF LLaVA-NeXT's `pack_image_features`: stitch the grid, unpad, a newline token per row, base view first."""
    return model.pack_image_features(
        features, image_sizes, vision_feature_select_strategy=strategy, image_newline=newline
    )


def onevision_pack(model, features, image_sizes, newline, strategy, image_mode):
    """HF LLaVA-OneVision's `pack_image_features`: NeXT's packing, with grids above anyres_max_N downsampled."""
    return model.pack_image_features(features, image_sizes, image_newline=newline, vision_aspect_ratio=image_mode)


# -- video frames ---------------------------------------------------------------------------------------------------
def next_video_frames(model: nn.Module, selected: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT-Video: the model's own resampler (pooling over each frame's patch grid), then the projector.

    The layers go into the batch axis, so every resampler mode (average, max, conv) treats each layer as HF treats
    the main feature."""
    frames, tokens, layers, channels = selected.shape
    per_layer = selected.transpose(1, 2).reshape(frames * layers, tokens, channels)
    projected = model.multi_modal_projector(model.vision_resampler(per_layer))
    return projected.view(frames, layers, *projected.shape[1:]).transpose(1, 2)


def onevision_video_frames(model: nn.Module, selected: torch.Tensor) -> torch.Tensor:
    """LLaVA-OneVision: the projector, then HF's `apply_pooling` (2x bilinear on each frame's patch grid).

    Bilinear pooling acts on each channel alone, so the layers fold into the channels and pool in one call."""
    frames, tokens, layers, _ = selected.shape
    projected = model.multi_modal_projector(selected)  # (frames, T, N, D)
    pooled = model.apply_pooling(projected.reshape(frames, tokens, -1))
    return pooled.view(frames, pooled.shape[1], layers, -1)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="llava",
        model_class=LlavaForConditionalGeneration,
        inner_class=LlavaModel,
        crops=one_crop_per_image,
        pack=None,
        placeholder_masks=("image",),
    ),
    ModelFamily(
        name="llava_next",
        model_class=LlavaNextForConditionalGeneration,
        inner_class=LlavaNextModel,
        crops=next_crops,
        pack=next_pack,
        placeholder_masks=("image",),
    ),
    ModelFamily(
        name="llava_next_video",
        model_class=LlavaNextVideoForConditionalGeneration,
        inner_class=LlavaNextVideoModel,
        crops=next_crops,
        pack=next_pack,
        placeholder_masks=("image", "video"),
        video_frames=next_video_frames,
    ),
    ModelFamily(
        name="llava_onevision",
        model_class=LlavaOnevisionForConditionalGeneration,
        inner_class=LlavaOnevisionModel,
        crops=onevision_crops,
        pack=onevision_pack,
        placeholder_masks=("image", "video"),
        video_frames=onevision_video_frames,
        video_newline=True,
        square_images=True,
    ),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}


def supported_classes() -> str:
    return ", ".join(family.model_class.__name__ for family in FAMILIES)


def family_of(model: nn.Module) -> tuple[ModelFamily, nn.Module]:
    """The family of `model` (a supported ...ForConditionalGeneration or its inner ...Model) and its inner model."""
    for family in FAMILIES:
        if isinstance(model, family.model_class):
            return family, model.model
        if isinstance(model, family.inner_class):
            return family, model
    raise TypeError(
        f"the manager patches the LLaVA family: expected one of {supported_classes()} (or their inner models), "
        f"got {type(model).__name__}"
    )


def family_named(name: str) -> ModelFamily:
    """The family whose HF `model_type` is `name`."""
    if name not in FAMILY_BY_NAME:
        raise ValueError(f"unsupported model type {name!r}: expected one of {sorted(FAMILY_BY_NAME)}")
    return FAMILY_BY_NAME[name]
