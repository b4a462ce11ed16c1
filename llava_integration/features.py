"""Visual features for the manager: the selected vision layers, projected and packed like HF packs the main feature
(images) or pooled like HF pools it (video frames), so that row i of the result belongs to the i-th visual token
the language model receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .image_modes import SQUARE

# (per-image features `(crops, T, C)`, image sizes, newline `(C,)`) -> (per-image packed `(tokens, C)`, lengths)
Packing = Callable[[list, torch.Tensor, torch.Tensor], tuple[list, torch.Tensor]]


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


def stack_layers(
    hidden_states: tuple[torch.Tensor | None, ...], layers: list[int], select_strategy: str
) -> torch.Tensor:
    """The selected vision hidden states as `(num_crops, tokens_per_crop, N, C)`, the CLS token dropped by "default".

    The layer axis sits before the channels so that folding it into the channels (for packing) is a free view.
    """
    return torch.stack(_selected(hidden_states, layers, select_strategy), dim=2)


def _selected(hidden_states: tuple[torch.Tensor | None, ...], layers: list[int], select_strategy: str) -> list:
    """Each selected layer's `(num_crops, T, C)` hidden states, the CLS token dropped by "default"."""
    missing = [layer for layer in layers if hidden_states[layer] is None]
    if missing:
        raise RuntimeError(f"the vision tower did not return hidden states {missing}")
    first = 1 if select_strategy == "default" else 0
    return [hidden_states[layer][:, first:] for layer in layers]


def project_layers(
    projector: nn.Module, hidden_states: tuple[torch.Tensor | None, ...], layers: list[int], select_strategy: str
) -> torch.Tensor:
    """The selected vision hidden states through the model's own projector in one call: `(num_crops, T, N, D)`."""
    return projector(stack_layers(hidden_states, layers, select_strategy))


def packed_layers(
    projector: nn.Module,
    hidden_states: tuple[torch.Tensor | None, ...],
    layers: list[int],
    select_strategy: str,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    newline: torch.Tensor | None,
    stacked: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Each selected layer's features in packed order, `(len(rows), D)`, one layer at a time: at each crop token
    `rows[i]` (a host tensor, of `(num_crops * T)`) layer n through the projector plus `offsets[n]` (the layer
    embedding), at each -1 (a newline token) `newline`.

    The projector acts per token, so projecting only the kept rows equals packing after projecting. Given a list
    `stacked`, layer n is written into slab n of a layer-major `(N, len(rows), D)` buffer appended to it (made like
    the first projected layer: its dtype, its device). Otherwise layer n is the projector's rows themselves when
    packing keeps them in order, else one scratch `(len(rows), D)` reused by every layer (read each layer before
    asking for the next; not for autograd).
    """
    is_newline = rows < 0  # host tensors: no device sync
    kept = rows[~is_newline]
    placed = (~is_newline).nonzero().squeeze(1) if bool(is_newline.any()) else None
    newlines = is_newline.nonzero().squeeze(1)
    kept_on_device, placed_on_device, scratch = None, None, None
    for n, hidden in enumerate(_selected(hidden_states, layers, select_strategy)):
        flat = hidden.reshape(-1, hidden.shape[-1])
        if n == 0:
            every = kept.numel() == flat.shape[0] and bool((kept == torch.arange(kept.numel())).all())
            kept_on_device = None if every else kept.to(flat.device, non_blocking=True)  # None: all rows, in order
            if placed is not None:
                placed_on_device = placed.to(flat.device, non_blocking=True)
                newlines = newlines.to(flat.device, non_blocking=True)
        projected = projector(flat if kept_on_device is None else flat.index_select(0, kept_on_device))
        layer = projected + offsets[n].to(projected.dtype)
        if stacked is None and placed is None:
            yield layer
            continue
        if stacked is not None and not stacked:
            stacked.append(layer.new_empty((len(layers), rows.numel(), layer.shape[-1])))
        target = stacked[0][n] if stacked is not None else scratch
        if target is None:
            target = scratch = layer.new_empty((rows.numel(), layer.shape[-1]))
        if placed is None:
            target.copy_(layer)
        else:
            if target is not scratch or n == 0:  # a fresh layer of the buffer, or the scratch's first use
                target[newlines] = newline.to(target.dtype)
            target.index_copy_(0, placed_on_device, layer)
        yield target


def project_packed(
    projector: nn.Module,
    hidden_states: tuple[torch.Tensor | None, ...],
    layers: list[int],
    select_strategy: str,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """`packed_layers` stacked, `(len(rows), N, D)`: a layer-major `(N, V, D)` buffer, each layer written once and
    contiguous (how the managers read it), returned transposed."""
    stacked = []
    for _ in packed_layers(projector, hidden_states, layers, select_strategy, rows, offsets, newline, stacked):
        pass
    return stacked[0].transpose(0, 1)


def pack_like_main_feature(
    model: nn.Module,
    experts: torch.Tensor,
    image_sizes: torch.Tensor,
    crops: list[int],
    pack: Packing | None,
    packing: tuple[torch.Tensor | None, list[int]] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Pack `(num_crops, T, N, D)` per-layer features exactly as HF packs the main feature with `pack`.

    HF's `pack_image_features` stitches crops, unpads, bilinearly downsamples (anyres_max) and appends newline
    tokens. All of these act on each channel alone, so the N layers fold into the channel axis and go through that
    same public method; every layer's newline token is the model's `image_newline`. Without `pack` (LLaVA-1.5,
    square images) each crop's tokens are the image's, with no newline token. Returns `(num_visual_tokens, N, D)`
    and the tokens per image. `packing` is `packed_rows`' answer for these shapes when the caller has it.
    """
    num_crops, tokens, layers, hidden = experts.shape
    if pack is None:
        return experts.reshape(num_crops * tokens, layers, hidden), [tokens] * num_crops
    rows, lengths = packed_rows(image_sizes, crops, tokens, pack) if packing is None else packing
    if rows is not None:
        # Packing only selected and reordered tokens: one gather of the N-layer features instead of HF's four
        # copies of them (stitch, newline, base view, images), then the newline rows.
        newlines = (rows < 0).nonzero().squeeze(1)  # host tensors: no device sync
        flat = experts.reshape(num_crops * tokens, layers, hidden)
        packed = flat.index_select(0, rows.clamp(min=0).to(experts.device, non_blocking=True))
        packed[newlines.to(experts.device, non_blocking=True)] = model.image_newline.to(packed.dtype)
        return packed, lengths
    folded = experts.reshape(num_crops, tokens, layers * hidden)
    newline = model.image_newline.to(experts.dtype).repeat(layers)
    packed, lengths = pack(list(torch.split(folded, crops, dim=0)), image_sizes, newline)
    return torch.cat(packed, dim=0).view(-1, layers, hidden), lengths.tolist()


def packed_rows(
    image_sizes: torch.Tensor, crops: list[int], tokens: int, pack: Packing
) -> tuple[torch.Tensor | None, list[int]]:
    """Which crop token (row of `(num_crops * T)`) HF's packing puts at each visual token, -1 for a newline token.

    Found by packing the row indices `i` and their squares through HF's own `pack_image_features` (on the host, in
    float64: exact). None when some image was bilinearly downsampled: a token mixed from several rows has
    mean(i^2) > mean(i)^2, so equality everywhere proves that packing only selected rows.
    """
    index = torch.arange(sum(crops) * tokens, dtype=torch.float64)
    probe = torch.stack((index, index * index), dim=-1).view(sum(crops), tokens, 2)
    packed, lengths = pack(
        list(torch.split(probe, crops, dim=0)), image_sizes.cpu(), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    )
    packed = torch.cat(packed, dim=0)
    rows = packed[:, 0] if torch.equal(packed[:, 1], packed[:, 0] ** 2) else None
    return (None if rows is None else rows.long()), lengths.tolist()


def video_features(
    model: nn.Module,
    frame_features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    selected: torch.Tensor,
    num_videos: int,
    embed: Callable[[torch.Tensor], torch.Tensor],
    newline: bool,
) -> tuple[torch.Tensor, list[int]]:
    """Per-layer features of every video token: `(num_video_tokens, N, D)` and the tokens per video.

    `selected` `(videos * frames, T, N, C)` goes through the family's own frame pooling and projection
    (`frame_features`), gets the layer embedding (`embed`), and each video's frames are laid end to end, closed by
    the model's `image_newline` in every layer where HF closes the main feature with it (OneVision).
    """
    frames = frame_features(model, selected)  # (videos * frames, T', N, D)
    experts = embed(frames).reshape(num_videos, -1, *frames.shape[2:])  # (videos, frames * T', N, D)
    if newline:
        closing = model.image_newline.to(experts.dtype).expand(num_videos, 1, experts.shape[2], -1)
        experts = torch.cat((experts, closing), dim=1)
    return experts.reshape(-1, *experts.shape[2:]), [experts.shape[1]] * num_videos


def grid_selection(lengths: list[int], base_tokens: int, grid_type: str) -> torch.Tensor | None:
    """Which packed tokens the manager serves, as a host mask: all (None), the base view's (`main`), or the rest
    (`grid`). Computed from the host's token counts: no device work, no sync."""
    if grid_type == "all":
        return None
    lengths_t = torch.tensor(lengths)
    offset = torch.arange(sum(lengths)) - torch.repeat_interleave(torch.cumsum(lengths_t, 0) - lengths_t, lengths_t)
    return offset < base_tokens if grid_type == "main" else offset >= base_tokens
