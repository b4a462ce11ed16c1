"""Image transforms of the reference, by name: CLIP-normalised tensors at the model's image size."""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def _clip(size: int) -> T.Compose:
    """Resize the short side, centre crop (the reference's `clip`)."""
    return T.Compose(
        [T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    )


def _square(size: int) -> T.Compose:
    """Resize to a square, no crop (the reference's `albef`, its evaluation transform for fine-tuning)."""
    return T.Compose([T.Resize((size, size), interpolation=BICUBIC), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def _randaug(size: int, flip: bool) -> T.Compose:
    # The reference's `albef_randaug*`: random resized crop (0.5..1), optional flip, two random ops of magnitude 7.
    # torchvision's RandAugment stands in for ALBEF's RandomAugment (a similar but not identical set of ops).
    steps = [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=BICUBIC)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.RandAugment(num_ops=2, magnitude=7), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


TRANSFORMS: dict[str, Callable[[int], T.Compose]] = {
    "clip": _clip,
    "square": _square,
    "randaug": lambda size: _randaug(size, flip=True),
    # VQA questions speak of left and right, so its training transform does not flip.
    "randaug_noflip": lambda size: _randaug(size, flip=False),
}


def build_transform(name: str, size: int) -> T.Compose:
    """The transform registered under `name`, for `size` x `size` images."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown image transform {name!r}: expected one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name](size)
