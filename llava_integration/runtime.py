"""The hooks that run a manager inside an HF `LlavaOnevisionModel`, installed and removed as one unit.

One forward of the patched model:
1. a pre-hook on the model opens a `_ForwardState` when the call carries images (prefill only: decode steps of
   `generate` carry none, so the KV-cache path is untouched);
2. the wrapped `get_image_features` asks the vision tower for the main layer *and* the manager's layers in the same
   pass, and projects (with the model's projector, plus the layer embedding) the managed tokens only, in the order
   HF packs the main feature (`features.py`); static managers turn them into each injection layer's delta at once;
3. the wrapped `get_placeholder_mask` records the exact mask HF scatters the visual tokens into;
4. a pre-hook on each injection decoder layer adds the manager's output at those positions, for the whole batch at
   once; each delta is freed once added, and the features after the last injection layer;
5. a post-hook on the model drops the state, also when the forward raised.

The same runtime also serves square images (no grid): each image is its base view, `T` tokens, no newline token.
When `generate` encodes the images before its prefill, the runtime keeps the features (`_Encoding`) and HF carries
row ids into them, until the prefill (whole, or chunk by chunk) has read every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from manager_plugin import LayerManagers

from .features import (
    SQUARE,
    base_view_rows,
    base_views,
    grid_selection,
    pack_like_main_feature,
    packed_rows,
    patches_per_image,
    project_layers,
    project_rows,
)

QUERY_MASK_KWARG = "manager_query_mask"
# `generate` carries, per visual token, a row id into the encoding's features: (encoding serial << 32) | row, so that
# a stale encoding is recognised instead of read as another one's rows; UNMANAGED marks tokens the manager skips.
_SERIAL_SHIFT = 32
_ROW_MASK = (1 << _SERIAL_SHIFT) - 1
_UNMANAGED = _ROW_MASK


@dataclass
class ImageFeaturesWithManager(BaseModelOutputWithPooling):
    """`get_image_features`' output plus, for `generate`, where each visual token's manager features are.

    HF generation encodes images before the prefill forward and then expands (beam search) and slices (chunked
    prefill) `deepstack_features`, token-aligned with `pooler_output`. The manager rides along under that name: one
    entry holding, per image, a `(tokens, 1)` int64 tensor of row ids into the features the runtime keeps (never a
    copy of the features), released once the prefill has consumed every row.
    """

    deepstack_features: list[list[torch.Tensor]] | None = None


# Per managed token: the N layers' features `(M, N, D)` (adaptive managers, which read the stream), or what each
# injection layer adds `{layer: (M, D)}` (static managers: 6 rows of D instead of 13, each freed once added).
_Features = torch.Tensor | dict[int, torch.Tensor]


@dataclass
class _Encoding:
    """Manager features encoded outside a forward (by `generate`), waiting for the prefill forward(s) to read them."""

    serial: int
    features: _Features  # of the managed tokens only
    output: ImageFeaturesWithManager
    row_ids: list[torch.Tensor]  # the list handed out in `output.deepstack_features`
    managed: torch.Tensor | None  # (V,) bool over the visual tokens; None: all managed
    consumed: int = 0

    def total_rows(self) -> int:
        """Visual tokens the prefill will read, after `generate` expanded the output for beams."""
        carried = self.output.deepstack_features
        return sum(ids.shape[0] for ids in carried[0]) if carried else 0


@dataclass
class _ForwardState:
    pending_layers: set[int]
    query_mask: torch.Tensor | None = None  # (B, L): this forward's columns of the query mask
    query_outside: torch.Tensor | None = None  # (B,): the sample's query tokens reach outside this forward
    experts: torch.Tensor | None = None  # (M, N, D): managed tokens' features, for adaptive managers
    deltas: dict[int, torch.Tensor] | None = None  # static managers: injection layer -> (M, D), popped when added
    rows: torch.Tensor | None = None  # (V,) row of the features per visual token, -1 if unmanaged; None: identity
    managed: torch.Tensor | None = None  # (V,) bool: None when every visual token is managed (and rows is None)
    all_images: bool = True  # this forward holds every visual token of its batch (no chunked prefill split them)
    image_mask: torch.Tensor | None = None  # (B, T)
    positions: torch.Tensor | None = None  # (M',) flat indices into B * T of the managed tokens
    gather: torch.Tensor | None = None  # (M',) rows of the features for `positions`; None: they are aligned
    adaptive: dict = field(default_factory=dict)  # adaptive managers: per-forward query layout

    def set_features(self, features: _Features) -> None:
        if isinstance(features, dict):
            self.deltas = features
        else:
            self.experts = features

    def has_features(self) -> bool:
        return self.experts is not None or bool(self.deltas)

    def feature_rows(self) -> int:
        return self.experts.shape[0] if self.experts is not None else next(iter(self.deltas.values())).shape[0]


def _on(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if mask is None else mask.to(device, non_blocking=True)


class ManagerRuntime:
    """Owns every hook and wrapper put on one `LlavaOnevisionModel`; `uninstall` restores it exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.managers: LayerManagers | None = None
        self.prompt_query_mask: torch.Tensor | None = None  # set by `query.prompt_query`, for generate's prefill
        self._state: _ForwardState | None = None
        self._encoding: _Encoding | None = None  # the latest encoding made outside a forward, until consumed
        self._serial = 0
        self._model_handles: list = []
        self._layer_handles: list = []
        self._replaced: dict[str, object] = {}
        self._original = {}

    # -- installation --------------------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        for name, wrapper in (
            ("get_image_features", self.get_image_features),
            ("get_placeholder_mask", self.get_placeholder_mask),
        ):
            self._replaced[name] = model.__dict__.get(name)  # an instance attribute someone set before us, if any
            self._original[name] = getattr(model, name)
            setattr(model, name, wrapper)
        self._model_handles = [
            model.register_forward_pre_hook(self._begin, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),
        ]

    def uninstall(self) -> None:
        self.detach_managers()
        for handle in self._model_handles:
            handle.remove()
        self._model_handles = []
        for name, previous in self._replaced.items():
            if previous is None:
                delattr(self.model, name)
            else:
                setattr(self.model, name, previous)
        self._replaced = {}
        self._original = {}

    def attach_managers(self, managers: LayerManagers) -> None:
        self.managers = managers
        layers = self.model.language_model.layers
        self._layer_handles = [
            layers[index].register_forward_pre_hook(partial(self._inject, index), with_kwargs=True)
            for index in managers.config.injection_layers
        ]

    def detach_managers(self) -> None:
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles = []
        self.managers = None
        self._state = None
        self._encoding = None

    # -- one forward ---------------------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        query_mask = kwargs.pop(QUERY_MASK_KWARG, None)
        self._state = None
        if self.managers is None:
            return args, kwargs
        pending = set(self.managers.config.injection_layers)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate() encoded the images before this prefill forward (or one chunk of it)
            state = self._state_from_encoding(encoded, pending)
        elif kwargs.get("pixel_values", args[1] if len(args) > 1 else None) is not None:
            state = _ForwardState(pending)
        else:  # no images: a decode step, a text-only forward or a chunk of the prompt before the images
            return args, kwargs
        if self.managers.reads_query:
            self._window_query_mask(state, query_mask, args, kwargs)
        self._state = state
        return args, kwargs

    def _state_from_encoding(self, encoded, pending: set[int]) -> _ForwardState:
        """The state of a prefill forward reading features encoded earlier: their rows, never a copy of them."""
        carried = getattr(encoded, "deepstack_features", None)
        encoding = self._encoding
        if carried is None:
            raise ValueError(
                "precomputed mm_encoder_outputs['image'] lack the manager's features: compute them with this "
                "patched model's get_image_features, or pass pixel_values"
            )
        ids = carried[0][0] if len(carried[0]) == 1 else torch.cat(carried[0])
        ids = ids.view(-1)
        if encoding is None or bool(((ids >> _SERIAL_SHIFT) != encoding.serial).any()):
            raise ValueError(
                "precomputed mm_encoder_outputs['image'] were already consumed by an earlier forward (the manager "
                "frees its features after the prefill) or come from another encoding: call get_image_features again"
            )
        rows = ids & _ROW_MASK
        total = encoding.total_rows()
        state = _ForwardState(pending, all_images=ids.numel() == total)
        state.set_features(dict(encoding.features) if isinstance(encoding.features, dict) else encoding.features)
        if carried[0] is not encoding.row_ids:  # expanded for beams or sliced for a chunk: not the identity
            state.managed = rows != _UNMANAGED
            state.rows = rows
        else:
            state.managed = encoding.managed
        encoding.consumed += ids.numel()
        if encoding.consumed >= total:  # the prefill has read every row: generate's kwargs no longer pin them
            encoding.output.deepstack_features = None
            self._encoding = None
        return state

    def _window_query_mask(self, state: _ForwardState, query_mask: torch.Tensor | None, args: tuple, kwargs: dict):
        """This forward's columns of the query mask, which may cover the whole prompt of a chunked prefill."""
        query_mask = self.prompt_query_mask if query_mask is None else query_mask
        if query_mask is None:
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        if query_mask.dim() != 2 or batch % query_mask.shape[0] != 0:
            raise ValueError(
                f"{QUERY_MASK_KWARG} has shape {tuple(query_mask.shape)}: expected (batch, sequence) with batch "
                f"{batch} (or a divisor of it that generate expanded for beams)"
            )
        if query_mask.shape[0] != batch:  # generate repeats each sample for its beams / returned sequences
            query_mask = query_mask.repeat_interleave(batch // query_mask.shape[0], dim=0)
        query_mask = query_mask.to(device=tokens.device, dtype=torch.bool)
        if query_mask.shape[1] == length:
            start = 0
        elif query_mask.shape[1] >= past + length:
            start = past
        else:
            raise ValueError(
                f"{QUERY_MASK_KWARG} has {query_mask.shape[1]} columns: expected this forward's {length} tokens or "
                f"the whole prompt ({past} cached + {length} new tokens at least)"
            )
        window = query_mask[:, start : start + length]
        state.query_mask = window
        state.query_outside = query_mask.sum(dim=1) != window.sum(dim=1)

    def _end(self, module: nn.Module, args: tuple, output) -> None:
        self._state = None

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF's `get_image_features`, plus the manager's layers captured from the same vision pass."""
        config = self.model.config
        feature_layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        aspect = vision_aspect_ratio or config.vision_aspect_ratio
        manager_layers = self.managers.config.vision_layers if self.managers is not None else []
        caller_wants_hidden_states = kwargs.get("output_hidden_states") is True
        if manager_layers and not caller_wants_hidden_states:
            kwargs["output_hidden_states"] = [feature_layer, *manager_layers]

        if aspect == SQUARE:
            outputs = self._square_image_features(pixel_values, feature_layer, strategy, manager_layers, **kwargs)
        else:
            outputs = self._original["get_image_features"](
                pixel_values,
                image_sizes,
                vision_feature_layer=feature_layer,
                vision_feature_select_strategy=strategy,
                vision_aspect_ratio=aspect,
                batch_num_images=batch_num_images,
                **kwargs,
            )
        if not manager_layers:
            return outputs
        lengths = [feature.shape[0] for feature in outputs.pooler_output]  # visual tokens per image
        experts, managed = self._manager_features(
            outputs.hidden_states, image_sizes, batch_num_images, strategy, aspect, lengths
        )
        if not caller_wants_hidden_states:  # keep only what HF's own call keeps: the main feature's layer
            keep = feature_layer % len(outputs.hidden_states)
            outputs.hidden_states = tuple(
                hidden if index == keep else None for index, hidden in enumerate(outputs.hidden_states)
            )
        features = self._prepare(experts)
        del experts  # static managers: only their deltas stay alive
        if self._state is not None:  # inside a forward: the injection hooks read the features directly
            self._state.set_features(features)
            self._state.managed = managed
            return ImageFeaturesWithManager(**outputs)
        return self._issue(ImageFeaturesWithManager(**outputs), features, managed, lengths)

    def _prepare(self, experts: torch.Tensor) -> _Features:
        """Static managers add what does not depend on the stream: every injection layer's delta, computed now."""
        if self.managers.needs_state:
            return experts
        return {layer: self.managers(layer, experts) for layer in self.managers.config.injection_layers}

    def _issue(
        self, output: ImageFeaturesWithManager, features: _Features, managed: torch.Tensor | None, lengths: list
    ) -> ImageFeaturesWithManager:
        """Hand out row ids of the features for `generate` to expand and slice; the runtime keeps the features."""
        self._serial += 1
        first = features if isinstance(features, torch.Tensor) else next(iter(features.values()))
        count, device = first.shape[0], first.device
        if managed is None:
            rows = torch.arange(count, device=device)
        else:
            rows = torch.full(managed.shape, _UNMANAGED, dtype=torch.long, device=device)
            rows[managed] = torch.arange(count, device=device)
        ids = (rows | (self._serial << _SERIAL_SHIFT))[:, None]
        row_ids = list(torch.split(ids, lengths))
        output.deepstack_features = [row_ids]
        self._encoding = _Encoding(self._serial, features, output, row_ids, managed)
        return output

    def _square_image_features(
        self, pixel_values: torch.Tensor, feature_layer: int, strategy: str, manager_layers: list[int], **kwargs
    ):
        kwargs.pop("return_dict", None)
        kwargs.setdefault("output_hidden_states", [feature_layer, *manager_layers])
        outputs = self.model.vision_tower(base_views(pixel_values), return_dict=True, **kwargs)
        feature = outputs.hidden_states[feature_layer]
        if strategy == "default":
            feature = feature[:, 1:]
        outputs.pooler_output = list(self.model.multi_modal_projector(feature))
        return outputs

    def _manager_features(
        self,
        hidden_states: tuple,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None,
        strategy: str,
        aspect: str,
        lengths: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(M, N, D)` features of the managed visual tokens and which visual tokens those are (None: all).

        Only the managed tokens are projected: `grid_type` "main" the base views, "grid" the grid tokens, and none of
        the tokens unpadding drops. An image downsampled by anyres_max mixes tokens, so there every crop token is
        projected and packed through HF's own packing, then the managed ones kept.
        """
        config = self.managers.config
        crops = patches_per_image(self.model.config, image_sizes, batch_num_images, aspect)
        tokens = hidden_states[config.vision_layers[0]].shape[1] - (1 if strategy == "default" else 0)
        managed = grid_selection(lengths, tokens, config.grid_type)
        if aspect == SQUARE and managed is not None and bool(managed.all()):  # "main" on square images: all
            managed = None
        embedding = self.managers.layer_embedding.weight
        if aspect == SQUARE:
            rows = None if managed is None else managed.nonzero().squeeze(1)
        elif config.grid_type == "main":
            rows = base_view_rows(crops, tokens)
        else:
            rows, packed_lengths = packed_rows(self.model, image_sizes, crops, tokens, aspect)
            if packed_lengths != lengths:
                raise RuntimeError(f"the manager packs {packed_lengths} tokens per image, HF packed {lengths}")
            if rows is None:  # some image was downsampled
                projected = project_layers(self.model, hidden_states, config.vision_layers, strategy)
                experts, _ = pack_like_main_feature(
                    self.model, self.managers.layer_embedding(projected), image_sizes, crops, aspect
                )
                if managed is not None:
                    kept = managed.nonzero().squeeze(1)  # host: no device sync
                    experts = experts.index_select(0, kept.to(experts.device, non_blocking=True))
                return experts, _on(managed, experts.device)
            if managed is not None:
                rows = rows[managed]
        experts = project_rows(self.model, hidden_states, config.vision_layers, strategy, rows, embedding)
        return experts, _on(managed, experts.device)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """HF's `get_placeholder_mask`; the image mask is kept for the injection hooks."""
        image_mask, video_mask = self._original["get_placeholder_mask"](
            input_ids, inputs_embeds=inputs_embeds, image_features=image_features, video_features=video_features
        )
        if image_features is not None and self._state is not None:
            self._state.image_mask = image_mask[..., 0]
        return image_mask, video_mask

    def _inject(self, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        state = self._state
        if state is None or not state.has_features():
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = self._positions(state, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if state.deltas is not None:  # static managers: computed at encoding, freed once added
            delta = state.deltas.pop(layer)
            if state.gather is not None:
                delta = delta.index_select(0, state.gather)
        elif self.managers.needs_state and layer != 0:
            delta = self._adaptive_delta(layer, state, flat, positions, hidden.shape[:2])
        elif state.gather is None:
            delta = self.managers(layer, state.experts)
        elif state.gather.numel() >= state.experts.shape[0]:  # beams: every row, some repeated: weigh rows once
            delta = self.managers(layer, state.experts).index_select(0, state.gather)
        else:  # a chunk of the prefill: only its rows
            delta = self.managers(layer, state.experts.index_select(0, state.gather))
        updated = flat.index_add(0, positions, delta.to(hidden.dtype)).view_as(hidden)

        state.pending_layers.discard(layer)
        if not state.pending_layers:  # the last injection layer: free the per-layer features now
            state.experts = state.deltas = None
            state.adaptive = {}
        if args:
            return (updated, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": updated}

    def _positions(self, state: _ForwardState, hidden: torch.Tensor) -> torch.Tensor:
        """Flat positions of the managed visual tokens (and, for features read by row id, their rows)."""
        if state.positions is None:
            if state.image_mask is None:
                raise RuntimeError("the manager's features were captured but HF's image placeholder mask was not")
            positions = state.image_mask.reshape(-1).nonzero().squeeze(1)
            visual = state.managed.shape[0] if state.managed is not None else state.feature_rows()
            if positions.numel() != visual:
                raise RuntimeError(
                    f"the manager has features of {visual} visual tokens but the sequence holds "
                    f"{positions.numel()} image placeholder tokens"
                )
            if state.managed is not None:
                if state.rows is not None:
                    state.gather = state.rows[state.managed].to(hidden.device)
                positions = positions[state.managed.to(positions.device)]
            state.positions = positions.to(hidden.device)
        return state.positions

    def _adaptive_delta(
        self, layer: int, state: _ForwardState, flat: torch.Tensor, positions: torch.Tensor, batch_seq: torch.Size
    ) -> torch.Tensor:
        """The adaptive manager on the managed tokens of every sample as one flat row: no padding, no copies of the
        features; each token reads its own sample's query tokens through a per-token query mask."""
        experts = state.experts if state.gather is None else state.experts.index_select(0, state.gather)
        if not self.managers.reads_query:
            return self.managers(layer, experts[None], state=flat[positions][None])[0]
        if not state.adaptive:
            state.adaptive = self._query_layout(state, positions, *batch_seq)
        layout = state.adaptive
        return self.managers(
            layer,
            experts[None],
            state=flat[positions][None],
            query=flat[layout["query_positions"]][None],
            query_mask=layout["query_mask"][None],
        )[0]

    @staticmethod
    def _query_layout(state: _ForwardState, positions: torch.Tensor, batch_size: int, seq_len: int) -> dict:
        """Flat positions of each sample's query tokens (its instruction, else its visual tokens), and which of them
        each managed token reads."""
        device = positions.device
        visual = state.image_mask.to(device=device, dtype=torch.bool)
        if state.query_mask is None:
            query, fallback = visual, torch.ones(batch_size, dtype=torch.bool, device=device)
        else:
            has_query = state.query_mask.any(dim=1) | state.query_outside
            query = torch.where(has_query[:, None], state.query_mask, visual)
            fallback = ~has_query
        token_sample = positions // seq_len
        served = torch.zeros(batch_size, dtype=torch.bool, device=device)
        served[token_sample] = True
        if state.query_outside is not None and bool((served & state.query_outside).any()):
            split = (served & state.query_outside).nonzero().squeeze(1).tolist()
            raise ValueError(
                f"chunked prefill: samples {split} have visual tokens in this chunk but query tokens in another, and "
                "the adaptive manager reads them together: use a prefill_chunk_size that keeps each sample's images "
                "and instruction in one chunk, or none"
            )
        if not state.all_images and bool((served & fallback).any()):
            raise ValueError(
                "chunked prefill split the visual tokens of a sample without query tokens, which an adaptive query "
                "manager reads all together: pass the instruction as query (query.prompt_query) or use no chunking"
            )
        query_positions = query.reshape(-1).nonzero().squeeze(1)
        query_sample = query_positions // seq_len
        return {
            "query_positions": query_positions,
            "query_mask": token_sample[:, None] == query_sample[None, :],
        }
