"""Visual features of LLaVA-OneVision for the manager: the selected vision layers, projected and packed like HF packs
the main feature, so that row i of the result belongs to the i-th visual token the language model receives.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

SQUARE = "square"


def patches_per_image(
    config, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None, vision_aspect_ratio: str
) -> list[int]:
    """How many crops (base view first) HF's `get_image_features` cuts each image into."""
    if vision_aspect_ratio == SQUARE:
        return [1] * len(image_sizes)
    # As HF decides it: an image of a multi-image sample keeps its base view only. One host copy of each tensor, not
    # one device sync per image.
    if batch_num_images is None:
        grids = [True] * len(image_sizes)
    else:
        grids = [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
    return [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if grid else 1
        for size, grid in zip(image_sizes.tolist(), grids)
    ]


def base_views(pixel_values: torch.Tensor) -> torch.Tensor:
    """The base (whole-image) view of each image: `(num_images, C, H, W)`."""
    if pixel_values.dim() == 5:
        return pixel_values[:, 0]
    if pixel_values.dim() == 4:
        return pixel_values
    raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")


def project_layers(
    model: nn.Module, hidden_states: tuple[torch.Tensor | None, ...], layers: list[int], select_strategy: str
) -> torch.Tensor:
    """Stack the selected vision hidden states and run them through the model's own projector in one call.

    Returns `(num_crops, tokens_per_crop, N, D)`; the layer axis sits before the channels so that folding it into
    the channels (for packing) is a free view.
    """
    stacked = torch.stack(_selected(hidden_states, layers), dim=2)
    if select_strategy == "default":
        stacked = stacked[:, 1:]
    return model.multi_modal_projector(stacked)


def project_rows(
    model: nn.Module,
    hidden_states: tuple[torch.Tensor | None, ...],
    layers: list[int],
    select_strategy: str,
    rows: torch.Tensor | None,
    layer_embedding: torch.Tensor,
) -> torch.Tensor:
    """`(R, N, D)` features (projected, plus each layer's embedding) of the crop tokens at host indices `rows` into
    `(num_crops * tokens_per_crop)`, -1 for a newline token (the model's `image_newline`); None: every crop token.

    The projector acts on each token alone, so selecting tokens before projecting equals packing after it: only the
    tokens the manager serves are projected, one layer at a time (no stacked copy of every vision layer).
    """
    selected = _selected(hidden_states, layers)
    crops, length, channels = selected[0].shape
    skip = 1 if select_strategy == "default" else 0  # the CLS token
    device = selected[0].device
    if rows is None:
        rows = torch.arange(crops * (length - skip))
    kept = (rows >= 0).nonzero().squeeze(1)  # host tensors: no device sync
    newlines = (rows < 0).nonzero().squeeze(1)
    crop_rows = rows[kept]
    index = (crop_rows // (length - skip) * length + crop_rows % (length - skip) + skip).to(device, non_blocking=True)
    every_row = newlines.numel() == 0
    kept = kept.to(device, non_blocking=True)
    experts = None
    for n, hidden in enumerate(selected):
        # One layer at a time, written into the result: no stacked copy of the layers, no per-layer list alive.
        projected = (
            model.multi_modal_projector(hidden.reshape(-1, channels).index_select(0, index)) + layer_embedding[n]
        )
        if experts is None:
            experts = projected.new_empty((rows.numel(), len(selected), projected.shape[-1]))
        if every_row:
            experts[:, n] = projected
        else:
            experts[kept, n] = projected
    if not every_row:
        experts[newlines.to(device, non_blocking=True)] = model.image_newline.to(experts.dtype)
    return experts


def _selected(hidden_states: tuple[torch.Tensor | None, ...], layers: list[int]) -> list[torch.Tensor]:
    missing = [layer for layer in layers if hidden_states[layer] is None]
    if missing:
        raise RuntimeError(f"the vision tower did not return hidden states {missing}")
    return [hidden_states[layer] for layer in layers]


def base_view_rows(crops: list[int], tokens: int) -> torch.Tensor:
    """Host indices into `(num_crops * tokens)` of each image's base-view tokens (its first crop), image by image."""
    starts = torch.cumsum(torch.tensor([0, *crops[:-1]], dtype=torch.long), 0)
    return (starts[:, None] * tokens + torch.arange(tokens)).reshape(-1)


def pack_like_main_feature(
    model: nn.Module,
    experts: torch.Tensor,
    image_sizes: torch.Tensor,
    crops: list[int],
    vision_aspect_ratio: str,
) -> tuple[torch.Tensor, list[int]]:
    """Pack `(num_crops, T, N, D)` per-layer features exactly as HF packs the main feature.

    HF's `pack_image_features` stitches crops, unpads, bilinearly downsamples (anyres_max) and appends newline
    tokens. All of these act on each channel alone, so the N layers fold into the channel axis and go through that
    same public method; every layer's newline token is the model's `image_newline`. Returns `(num_visual_tokens, N, D)` and the tokens per image. Used when some
    image is downsampled; otherwise packing only selects tokens, and `project_rows` selects them before projecting.
    """
    num_crops, tokens, layers, hidden = experts.shape
    folded = experts.reshape(num_crops, tokens, layers * hidden)
    newline = model.image_newline.to(experts.dtype).repeat(layers)
    packed, lengths = model.pack_image_features(
        list(torch.split(folded, crops, dim=0)),
        image_sizes,
        image_newline=newline,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    return torch.cat(packed, dim=0).view(-1, layers, hidden), lengths.tolist()


def packed_rows(
    model: nn.Module, image_sizes: torch.Tensor, crops: list[int], tokens: int, vision_aspect_ratio: str
) -> tuple[torch.Tensor | None, list[int]]:
    """Which crop token (row of `(num_crops * T)`) HF's packing puts at each visual token, -1 for a newline token.

    Found by packing the row indices `i` and their squares through HF's own `pack_image_features` (on the host, in
    float64: exact). None when some image was bilinearly downsampled: a token mixed from several rows has
    mean(i^2) > mean(i)^2, so equality everywhere proves that packing only selected rows.
    """
    index = torch.arange(sum(crops) * tokens, dtype=torch.float64)
    probe = torch.stack((index, index * index), dim=-1).view(sum(crops), tokens, 2)
    packed, lengths = model.pack_image_features(
        list(torch.split(probe, crops, dim=0)),
        image_sizes.cpu(),
        image_newline=torch.tensor([-1.0, 1.0], dtype=torch.float64),
        vision_aspect_ratio=vision_aspect_ratio,
    )
    packed = torch.cat(packed, dim=0)
    rows = packed[:, 0] if torch.equal(packed[:, 1], packed[:, 0] ** 2) else None
    return (None if rows is None else rows.long()), lengths.tolist()


def grid_selection(lengths: list[int], base_tokens: int, grid_type: str) -> torch.Tensor | None:
    """Which packed tokens the manager serves, as a host bool tensor: all (None), the base view's (`main`), or the
    rest (`grid`). Computed from the lengths alone, on the host: no device work, no sync."""
    if grid_type == "all":
        return None
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    offset = torch.arange(sum(lengths)) - torch.repeat_interleave(starts, lengths_t)
    return offset < base_tokens if grid_type == "main" else offset >= base_tokens
