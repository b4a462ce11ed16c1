"""`ManagerTowerProcessor`: a RoBERTa tokenizer and the original CLIP-style image processing, in one HF processor.

`processor(images=..., text=..., return_tensors="pt")` gives `input_ids`, `attention_mask`, `pixel_values` and
`pixel_mask` (1 = image pixel, 0 = padding, as BridgeTower's), ready for `model(**inputs)` with the base model and
every head; NLVR2 takes a pair of images per text (`images=[[left, right], ...]`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.utils import TensorType


class ManagerTowerImageProcessor(PilBackend):
    r"""
    Images to `side` x `side` pixels (`side = size["shortest_edge"]`, the model's image size), scaled to [0, 1] and
    normalised with CLIP's mean and std, in one of three ways:

    - `do_center_crop=True` (default): the authors' `clip` transform: the shorter side resized to `side` (bicubic),
      then a centered square cropped (pre-training, and what BridgeTower's processor does);
    - `do_center_crop=False, do_pad=True`: the whole image, its longer side resized to `side`, padded at the bottom
      and right (zeros after normalisation) to the square;
    - `do_center_crop=False, do_pad=False`: resized to the square, aspect not kept: the authors' `albef` transform,
      which their fine-tuned models are evaluated with.

    `pixel_mask` marks the image pixels with 1 and the padding with 0 (all ones unless padded).
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "pixel_mask"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size: ClassVar[dict[str, int]] = {"shortest_edge": 288}
    default_to_square = False
    do_resize = True
    do_center_crop = True
    do_pad = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def _validate_preprocess_kwargs(self, **kwargs: Any) -> None:
        # The crop is a square of `size`'s side: there is no separate `crop_size` for HF's check to require.
        super()._validate_preprocess_kwargs(**{**kwargs, "do_center_crop": False})

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_center_crop: bool,
        do_pad: bool,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: str | TensorType | None,
        **kwargs: Any,
    ) -> BatchFeature:
        side = size.shortest_edge
        if not side:
            raise ValueError(f"size must be {{'shortest_edge': int}} (the model's image size), got {dict(size)}")
        pixels, masks = [], []
        fit = "crop" if do_center_crop else "pad" if do_pad else "stretch"
        for image in images:
            if do_resize:
                height, width = _resized(image, side, fit)
                image = self.resize(image, SizeDict(height=height, width=width), resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            image, mask = _crop_or_pad(image.astype(np.float32), side, fit)
            pixels.append(image)
            masks.append(mask)
        return BatchFeature(data={"pixel_values": pixels, "pixel_mask": masks}, tensor_type=return_tensors)


def _resized(image: np.ndarray, side: int, fit: str) -> tuple[int, int]:
    """(height, width) after resizing: the shorter side to `side` to crop (torchvision's `Resize(side)`, as the
    original), the longer side to pad, both sides to stretch."""
    height, width = image.shape[-2:]
    if fit == "stretch":
        return side, side
    short, long = sorted((height, width))
    if fit == "crop":
        new_short, new_long = side, int(side * long / short)
    else:
        new_short, new_long = max(1, int(side * short / long)), side
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _crop_or_pad(image: np.ndarray, side: int, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """A `side` x `side` image and its pixel mask: center-cropped (torchvision's `CenterCrop` offsets), or padded."""
    height, width = image.shape[-2:]
    if fit == "crop":
        if height < side or width < side:
            raise ValueError(f"cannot center-crop {side}x{side} from a {height}x{width} image: resize it first")
        top, left = round((height - side) / 2), round((width - side) / 2)
        return image[:, top : top + side, left : left + side], np.ones((side, side), dtype=np.int64)
    if height > side or width > side or (fit == "stretch" and (height, width) != (side, side)):
        raise ValueError(f"cannot fit a {height}x{width} image to {side}x{side} without cropping: resize it first")
    padded = np.zeros((image.shape[0], side, side), dtype=image.dtype)
    padded[:, :height, :width] = image
    mask = np.zeros((side, side), dtype=np.int64)
    mask[:height, :width] = 1
    return padded, mask


# The authors' evaluation transforms (`val_transform_keys`, and the training recipes' `eval_transform`) as settings.
EVAL_TRANSFORMS: dict[str, dict[str, bool]] = {
    "clip": {"do_center_crop": True},
    "albef": {"do_center_crop": False, "do_pad": False},
    "square": {"do_center_crop": False, "do_pad": False},
}


def image_processor_for(image_size: int, transform: str = "clip") -> ManagerTowerImageProcessor:
    """The image processor of a model at `image_size` evaluated with `transform` (a key of `EVAL_TRANSFORMS`)."""
    if transform not in EVAL_TRANSFORMS:
        raise ValueError(f"unknown evaluation transform {transform!r}: expected one of {sorted(EVAL_TRANSFORMS)}")
    return ManagerTowerImageProcessor(size={"shortest_edge": image_size}, **EVAL_TRANSFORMS[transform])


def _is_pairs(images: Any) -> bool:
    """Whether `images` is a batch of image pairs (NLVR2): a list of 2-element lists or tuples."""
    return (
        isinstance(images, (list, tuple))
        and len(images) > 0
        and all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in images)
    )


class ManagerTowerProcessor(ProcessorMixin):
    r"""
    A ManagerTower processor: `ManagerTowerImageProcessor` for images and a RoBERTa tokenizer for text, as
    `BridgeTowerProcessor`. Image pairs (`images=[[left, right], ...]`, NLVR2) give `pixel_values` of shape
    `(B, 2, C, H, W)` and `pixel_mask` `(B, 2, H, W)`.
    """

    def __init__(self, image_processor: ManagerTowerImageProcessor, tokenizer: Any) -> None:
        super().__init__(image_processor, tokenizer)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> BatchFeature:
        pairs = _is_pairs(images)
        if pairs:
            images = [image for pair in images for image in pair]
        outputs = super().__call__(images=images, text=text, **kwargs)
        if pairs:
            for key in ("pixel_values", "pixel_mask"):
                value = outputs[key]
                if isinstance(value, list):
                    outputs[key] = [value[i : i + 2] for i in range(0, len(value), 2)]
                else:
                    outputs[key] = value.reshape(len(value) // 2, 2, *value.shape[1:])
        return outputs


__all__ = ["EVAL_TRANSFORMS", "ManagerTowerImageProcessor", "ManagerTowerProcessor", "image_processor_for"]
