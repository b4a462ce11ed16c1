"""The image modes of LLaVA-OneVision (`vision_aspect_ratio`): square images, or AnyRes grids capped at N crops."""

from __future__ import annotations

import re

SQUARE = "square"
_ANYRES_MAX = re.compile(r"anyres_max_([1-9]\d*)")


def anyres_max_crops(mode: object) -> int | None:
    """N of an `anyres_max_<N>` mode (the most crops before the grid is downsampled), None for anything else."""
    match = _ANYRES_MAX.fullmatch(mode) if isinstance(mode, str) else None
    return int(match.group(1)) if match else None


def is_image_mode(mode: object) -> bool:
    """Whether `mode` is "square" or "anyres_max_<N>"."""
    return mode == SQUARE or anyres_max_crops(mode) is not None
