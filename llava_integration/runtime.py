"""The hooks that run a manager inside an HF LLaVA-family model, installed and removed as one unit.

One runtime serves every family in `families.py`; the family entry says where the seams are. One forward of the
patched model:
1. a pre-hook on the model opens a `_ForwardState` when the call carries images or videos (prefill only: decode
   steps of `generate` carry none, so the KV-cache path is untouched);
2. the wrapped `get_image_features` (and `get_video_features`) asks the vision tower for the main layer *and* the
   manager's layers in the same pass, projects the manager's layers with the model's projector, adds the layer
   embedding and packs (images) or pools (video frames) them like the main feature (`features.py`); static managers
   turn them into each injection layer's delta at once;
3. the wrapped `get_placeholder_mask` records the exact masks HF scatters the visual tokens into;
4. a pre-hook on each injection decoder layer adds the manager's output at those positions, for the whole batch at
   once; each delta is freed once added, and the features after the last injection layer;
5. a post-hook on the model drops the state, also when the forward raised.

The same runtime also serves LLaVA-OneVision's square images (no grid): each image is its base view, `T` tokens, no
newline token. When `generate` encodes the images (videos) before its prefill, the runtime keeps the features
(`_Encoding`, one per modality) and HF carries row ids into them, until the prefill (whole, or chunk by chunk) has
read every row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from manager_plugin import LayerManagers

from .families import ModelFamily
from .features import (
    SQUARE,
    base_views,
    grid_selection,
    pack_like_main_feature,
    packed_layers,
    packed_rows,
    project_layers,
    project_packed,
    stack_layers,
    video_features,
)

QUERY_MASK_KWARG = "manager_query_mask"
MODALITY_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}
# Arguments of `get_image_features` that only some families take; passed on only to those that do.
_IMAGE_EXTRAS = ("image_sizes", "vision_aspect_ratio", "batch_num_images")


# `generate` carries, per visual token, a row id into the encoding's features: (encoding serial << 32) | row, so that
# a stale encoding is recognised instead of read as another one's rows.
_SERIAL_SHIFT = 32
_ROW_MASK = (1 << _SERIAL_SHIFT) - 1
_UNSERVED = _ROW_MASK  # the row id of a visual token the manager does not serve (grid_type "main" / "grid")
_PACKINGS_KEPT = 64  # packing indices a runtime keeps, one per distinct set of image sizes


@dataclass
class ImageFeaturesWithManager(BaseModelOutputWithPooling):
    """`get_image_features`' (or `get_video_features`') output plus, for `generate`, where each visual token's manager
    features are.

    HF generation encodes images and videos before the prefill forward and then expands (beam search) and slices
    (chunked prefill) `deepstack_features`, token-aligned with `pooler_output`. The manager rides along under that
    name: one entry holding, per image (video), a `(tokens, 1)` int64 tensor of row ids into the features the runtime
    keeps (never a copy of the features), released once the prefill has consumed every row.
    """

    deepstack_features: list[list[torch.Tensor]] | None = None


# Per visual token: the N layers' features `(V, N, D)` (adaptive managers, which read the stream), or what each
# injection layer adds `{layer: (V, D)}` (static managers: 6 rows of D instead of 13, each freed once added).
_Features = torch.Tensor | dict[int, torch.Tensor]


@dataclass
class _Encoding:
    """Manager features of one modality encoded outside a forward (by `generate`), waiting for the prefill."""

    serial: int
    features: _Features
    output: ImageFeaturesWithManager
    row_ids: list[torch.Tensor]  # the list handed out in `output.deepstack_features`
    partial: bool = False  # some visual tokens are not served: their row id is `_UNSERVED`
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
    features: dict[str, _Features] = field(default_factory=dict)  # modality -> features in placeholder order
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (V_m,) rows read by id (not identity)
    managed: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> which visual tokens are served
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (B, T) placeholder mask
    all_visual: bool = True  # this forward holds every visual token of its batch (no chunked prefill split them)
    positions: torch.Tensor | None = None  # (V,) flat indices into B * T of the served tokens, in sequence order
    visual_positions: torch.Tensor | None = None  # every visual token's, where some are not served
    order: torch.Tensor | None = None  # (V,) sequence order of the modalities' concatenated rows; None: one modality
    experts: torch.Tensor | None = None  # adaptive managers: (V, N, D) aligned with `positions`
    adaptive: dict = field(default_factory=dict)  # adaptive managers: per-forward query layout


class ManagerRuntime:
    """Owns every hook and wrapper put on one inner LLaVA-family model; `uninstall` restores it exactly."""

    def __init__(self, model: nn.Module, family: ModelFamily) -> None:
        self.model = model
        self.family = family
        self.managers: LayerManagers | None = None
        self.prompt_query_mask: torch.Tensor | None = None  # set by `query.prompt_query`, for generate's prefill
        self._state: _ForwardState | None = None
        self._encodings: dict[str, _Encoding] = {}  # modality -> the latest encoding made outside a forward
        self._serial = 0
        self._model_handles: list = []
        self._layer_handles: list = []
        self._replaced: dict[str, object] = {}
        self._original = {}
        self._image_extras: list[str] = []  # the `_IMAGE_EXTRAS` the wrapped get_image_features takes
        self._packings: dict[tuple, tuple[torch.Tensor | None, list[int]]] = {}  # image shapes -> `packed_rows`

    # -- installation --------------------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        wrappers = [
            ("get_image_features", self.get_image_features),
            ("get_placeholder_mask", self.get_placeholder_mask),
        ]
        if self.family.videos:
            wrappers.append(("get_video_features", self.get_video_features))
        for name, wrapper in wrappers:
            self._replaced[name] = model.__dict__.get(name)  # an instance attribute someone set before us, if any
            self._original[name] = getattr(model, name)
            setattr(model, name, wrapper)
        accepted = inspect.signature(self._original["get_image_features"]).parameters
        self._image_extras = [name for name in _IMAGE_EXTRAS if name in accepted]
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
        layers = self.family.part(self.model, "decoder_layers")
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
        self._encodings = {}

    # -- one forward ---------------------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        query_mask = kwargs.pop(QUERY_MASK_KWARG, None)
        self._state = None
        if self.managers is None:
            return args, kwargs
        state = _ForwardState(set(self.managers.config.injection_layers))
        encoded = kwargs.get("mm_encoder_outputs") or {}
        raw = {"image": kwargs.get("pixel_values", args[1] if len(args) > 1 else None)}
        raw["video"] = kwargs.get("pixel_values_videos")
        opened = False
        for modality in self.managed_modalities():
            if encoded.get(modality) is not None:  # generate() encoded them before this prefill forward (or chunk)
                opened = self._read_encoding(state, modality, encoded[modality]) or opened
            opened = opened or raw[modality] is not None
        if not opened:  # a decode step, a text-only forward or a chunk of the prompt without visual tokens
            return args, kwargs
        if self.managers.reads_query:
            self._window_query_mask(state, query_mask, args, kwargs)
        self._state = state
        return args, kwargs

    def _read_encoding(self, state: _ForwardState, modality: str, encoded) -> bool:
        """Give `state` the rows of the features encoded earlier that this forward reads, never a copy of them."""
        carried = getattr(encoded, "deepstack_features", None)
        if carried is None:
            raise ValueError(
                f"precomputed mm_encoder_outputs[{modality!r}] lack the manager's features: compute them with this "
                f"patched model's get_{modality}_features, or pass {MODALITY_INPUTS[modality]}"
            )
        if not carried[0]:
            return False
        ids = (carried[0][0] if len(carried[0]) == 1 else torch.cat(carried[0])).view(-1)
        encoding = self._encodings.get(modality)
        if encoding is None or bool(((ids >> _SERIAL_SHIFT) != encoding.serial).any()):
            raise ValueError(
                f"precomputed mm_encoder_outputs[{modality!r}] were already consumed by an earlier forward (the "
                "manager frees its features after the prefill) or come from another encoding: call "
                f"get_{modality}_features again"
            )
        total = encoding.total_rows()
        state.all_visual = state.all_visual and ids.numel() == total
        features = encoding.features
        state.features[modality] = dict(features) if isinstance(features, dict) else features
        identity = carried[0] is encoding.row_ids  # else expanded for beams or sliced for a chunk
        rows = ids & _ROW_MASK
        if encoding.partial:
            served = rows != _UNSERVED
            state.managed[modality] = served
            rows = rows[served]
        if not identity:
            state.rows[modality] = rows
        encoding.consumed += ids.numel()
        if encoding.consumed >= total:  # the prefill has read every row: generate's kwargs no longer pin them
            encoding.output.deepstack_features = None
            del self._encodings[modality]
        return True

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

    def managed_modalities(self) -> list[str]:
        """The modalities the manager acts on in this family: "image" and/or "video"."""
        wanted = self.managers.config.modalities
        image = ["image"] if wanted in ("images", "both") else []
        video = ["video"] if wanted in ("videos", "both") and self.family.videos else []
        return image + video

    def _end(self, module: nn.Module, args: tuple, output) -> None:
        self._state = None

    def _main_feature(self, layer: int | list[int] | None, strategy: str | None) -> tuple[int | list[int], str]:
        """The main vision feature layer and select strategy of this call: the arguments, else the config's."""
        config = self.model.config
        layer = getattr(config, self.family.feature_layer) if layer is None else layer
        return layer, strategy or getattr(config, self.family.select_strategy)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.Tensor | None = None,
        **kwargs,
    ):
        """HF's `get_image_features`, plus the manager's layers captured from the same vision pass."""
        config = self.model.config
        feature_layer, strategy = self._main_feature(vision_feature_layer, vision_feature_select_strategy)
        aspect = vision_aspect_ratio or getattr(config, "vision_aspect_ratio", None)
        managed = self.managers is not None and "image" in self.managed_modalities()
        manager_layers = self.managers.config.vision_layers if managed else []
        caller_wants_hidden_states = kwargs.get("output_hidden_states") is True
        if manager_layers and not caller_wants_hidden_states:
            kwargs["output_hidden_states"] = [feature_layer, *manager_layers]

        if aspect == SQUARE and self.family.square_images:
            outputs = self._square_image_features(pixel_values, feature_layer, strategy, manager_layers, **kwargs)
        else:
            extras = {"image_sizes": image_sizes, "vision_aspect_ratio": aspect, "batch_num_images": batch_num_images}
            outputs = self._original["get_image_features"](
                pixel_values,
                vision_feature_layer=feature_layer,
                vision_feature_select_strategy=strategy,
                **{name: extras[name] for name in self._image_extras if extras[name] is not None},
                **kwargs,
            )
        if not manager_layers:
            return outputs
        experts, lengths, managed = self._manager_features(
            outputs.hidden_states, image_sizes, batch_num_images, strategy, aspect
        )
        return self._hand_over("image", outputs, experts, lengths, feature_layer, caller_wants_hidden_states, managed)

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        """HF's `get_video_features`, plus the manager's layers of every frame, pooled as HF pools the main feature."""
        feature_layer, strategy = self._main_feature(vision_feature_layer, vision_feature_select_strategy)
        managed = self.managers is not None and "video" in self.managed_modalities()
        manager_layers = self.managers.config.vision_layers if managed else []
        caller_wants_hidden_states = kwargs.get("output_hidden_states") is True
        if manager_layers and not caller_wants_hidden_states:
            kwargs["output_hidden_states"] = [feature_layer, *manager_layers]
        outputs = self._original["get_video_features"](
            pixel_values_videos, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy, **kwargs
        )
        if not manager_layers:
            return outputs
        selected = stack_layers(outputs.hidden_states, manager_layers, strategy)
        experts, lengths = video_features(
            self.model,
            self.family.video_frames,
            selected,
            pixel_values_videos.shape[0],
            self.managers.layer_embedding,
            self.family.video_newline,
        )
        return self._hand_over("video", outputs, experts, lengths, feature_layer, caller_wants_hidden_states)

    def _hand_over(
        self,
        modality: str,
        outputs,
        experts: _Features,
        lengths: list[int],
        feature_layer: int | list[int],
        caller_wants_hidden_states: bool,
        managed: torch.Tensor | None = None,
    ) -> ImageFeaturesWithManager:
        """Inside a forward, give the features to its state; outside (generate), keep them and hand out row ids.

        `experts` holds the served visual tokens only; `managed` (host, one entry per visual token) says which those
        are, None when all are."""
        if not caller_wants_hidden_states:  # keep only what HF's own call keeps: the main feature's layer(s)
            count = len(outputs.hidden_states)
            keep = {layer % count for layer in (feature_layer if isinstance(feature_layer, list) else [feature_layer])}
            outputs.hidden_states = tuple(
                hidden if index in keep else None for index, hidden in enumerate(outputs.hidden_states)
            )
        features = self._prepare(experts)
        del experts  # static managers: only their deltas stay alive
        if self._state is not None:  # inside a forward: the injection hooks read the features directly
            self._state.features[modality] = features
            if managed is not None:
                self._state.managed[modality] = managed
            return ImageFeaturesWithManager(**outputs)
        return self._issue(modality, ImageFeaturesWithManager(**outputs), features, lengths, managed)

    def _prepare(self, experts: _Features) -> _Features:
        """Static managers add what does not depend on the stream: every injection layer's delta, computed now (or
        already, layer by layer, by `_manager_features`)."""
        if self.managers.needs_state or isinstance(experts, dict):
            return experts
        return {layer: self.managers(layer, experts) for layer in self.managers.config.injection_layers}

    def _issue(
        self,
        modality: str,
        output: ImageFeaturesWithManager,
        features: _Features,
        lengths: list[int],
        managed: torch.Tensor | None,
    ) -> ImageFeaturesWithManager:
        """Hand out row ids of the features for `generate` to expand and slice; the runtime keeps the features."""
        self._serial += 1
        first = features if isinstance(features, torch.Tensor) else next(iter(features.values()))
        if managed is None:
            rows = torch.arange(first.shape[0], device=first.device)
        else:  # one id per visual token; those the manager does not serve point at no row
            rows = torch.full(managed.shape, _UNSERVED, dtype=torch.long)
            rows[managed] = torch.arange(first.shape[0])
            rows = rows.to(first.device, non_blocking=True)
        ids = (rows | (self._serial << _SERIAL_SHIFT))[:, None]
        row_ids = list(torch.split(ids, lengths))
        output.deepstack_features = [row_ids]
        self._encodings[modality] = _Encoding(self._serial, features, output, row_ids, partial=managed is not None)
        return output

    def _square_image_features(
        self, pixel_values: torch.Tensor, feature_layer: int, strategy: str, manager_layers: list[int], **kwargs
    ):
        kwargs.pop("return_dict", None)
        kwargs.setdefault("output_hidden_states", [feature_layer, *manager_layers])
        outputs = self.family.part(self.model, "vision_tower")(base_views(pixel_values), return_dict=True, **kwargs)
        feature = outputs.hidden_states[feature_layer]
        if strategy == "default":
            feature = feature[:, 1:]
        outputs.pooler_output = list(self.family.part(self.model, "projector")(feature))
        return outputs

    def _manager_features(
        self,
        hidden_states: tuple,
        image_sizes: torch.Tensor | None,
        batch_num_images: torch.Tensor | None,
        strategy: str,
        aspect: str | None,
    ) -> tuple[_Features, list[int], torch.Tensor | None]:
        """`(V_served, N, D)` features of the image tokens the manager serves (static managers at inference: each
        injection layer's `(V_served, D)` delta), the tokens per image, and which visual tokens those are (a host mask
        over all of them; None: every one)."""
        config = self.managers.config
        projector = self.family.part(self.model, "projector")
        family = self.family
        first = hidden_states[config.vision_layers[0]]
        tokens = first.shape[1] - (1 if strategy == "default" else 0)
        # Every shape computation below reads one host copy of the sizes (none is made when they are on the host).
        sizes = None if image_sizes is None else image_sizes.cpu()
        crops = family.crops(self.model.config, first.shape[0], sizes, batch_num_images, aspect)
        pack = family.packing(self.model, strategy, aspect)
        if pack is None:  # each crop's tokens are the image's (LLaVA-1.5, square images)
            rows, lengths = torch.arange(first.shape[0] * tokens), [tokens] * first.shape[0]
        else:
            rows, lengths = self._packing(sizes, crops, tokens, pack, strategy, aspect)
        managed = grid_selection(lengths, tokens, config.grid_type)
        if rows is not None:  # packing only selects crop tokens: the served ones
            served = rows if managed is None else rows[managed]
        elif config.grid_type == "main":  # base views are never downsampled: each image's first crop, in order
            starts = torch.tensor([0, *crops[:-1]]).cumsum(0) * tokens
            served = (starts[:, None] + torch.arange(tokens)).reshape(-1)
        else:
            served = None
        newline = getattr(self.model, "image_newline", None)  # LLaVA-1.5 and square images have no newline token
        embedding = self.managers.layer_embedding.weight  # added layer by layer
        if served is not None and self.managers.sums_layer_by_layer:
            # Static managers at inference: every injection layer's delta summed layer by layer, no (V, N, D) stack.
            layers = packed_layers(projector, hidden_states, config.vision_layers, strategy, served, embedding, newline)
            return self.managers.static_deltas(layers), lengths, managed
        if served is not None:  # project the served crop tokens only, one layer at a time
            experts = project_packed(
                projector,
                hidden_states,
                config.vision_layers,
                strategy,
                served,
                embedding,
                newline,
            )
        else:  # some image downsampled (packing mixes tokens): project every token, pack, keep the served tokens
            projected = project_layers(projector, hidden_states, config.vision_layers, strategy)
            experts = self.managers.layer_embedding(projected)
            del projected
            experts, lengths = pack_like_main_feature(self.model, experts, sizes, crops, pack, (rows, lengths))
            if managed is not None:
                experts = experts.index_select(0, managed.nonzero().squeeze(1).to(experts.device, non_blocking=True))
        return experts, lengths, managed

    def _packing(
        self, sizes: torch.Tensor, crops: list[int], tokens: int, pack, strategy: str, aspect: str | None
    ) -> tuple[torch.Tensor | None, list[int]]:
        """`packed_rows` for these image shapes, found once per distinct set of sizes (the model's packing settings
        are part of the key) and reused by later forwards."""
        config = self.model.config
        key = (
            strategy,
            aspect,
            tokens,
            tuple(crops),
            tuple(map(tuple, sizes.tolist())),
            repr(getattr(config, "image_grid_pinpoints", None)),
            config.vision_config.image_size,
        )
        packing = self._packings.pop(key, None) or packed_rows(sizes, crops, tokens, pack)
        self._packings[key] = packing  # the most recently used last
        if len(self._packings) > _PACKINGS_KEPT:
            del self._packings[next(iter(self._packings))]
        return packing

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """HF's `get_placeholder_mask`; the masks of the features given are kept for the injection hooks."""
        given = {"image": image_features, "video": video_features}
        result = self._original["get_placeholder_mask"](
            input_ids, inputs_embeds=inputs_embeds, **{f"{m}_features": given[m] for m in self.family.placeholder_masks}
        )
        masks = dict(zip(self.family.placeholder_masks, result if isinstance(result, tuple) else (result,)))
        if self._state is not None:
            for modality, features in given.items():
                if features is not None:
                    self._state.masks[modality] = masks[modality][..., 0]
        return result

    def _inject(self, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        state = self._state
        if state is None or not state.features:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = self._positions(state, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.managers.needs_state:
            experts = self._experts(state)
            if layer != 0:
                delta = self._adaptive_delta(layer, state, experts, flat, positions, hidden.shape[:2])
            else:
                delta = self.managers(layer, experts)
        else:  # static managers: each layer's delta computed at encoding, freed once added
            delta = self._merged({m: features.pop(layer) for m, features in state.features.items()}, state)
        updated = flat.index_add(0, positions, delta.to(hidden.dtype)).view_as(hidden)

        state.pending_layers.discard(layer)
        if not state.pending_layers:  # the last injection layer: free the per-layer features now
            state.features, state.experts, state.adaptive = {}, None, {}
        if args:
            return (updated, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": updated}

    @staticmethod
    def _merged(per_modality: dict[str, torch.Tensor], state: _ForwardState) -> torch.Tensor:
        """The modalities' rows this forward reads (by row id where generate expanded or sliced them), in sequence
        order."""
        parts = []
        for modality, rows in per_modality.items():
            gather = state.rows.get(modality)
            parts.append(rows if gather is None else rows.index_select(0, gather.to(rows.device)))
        merged = parts[0] if len(parts) == 1 else torch.cat(parts)
        return merged if state.order is None else merged.index_select(0, state.order.to(merged.device))

    def _experts(self, state: _ForwardState) -> torch.Tensor:
        """Adaptive managers: `(V, N, D)` of this forward's managed tokens, aligned with `state.positions`."""
        if state.experts is None:
            state.experts = self._merged(state.features, state)
        return state.experts

    def _positions(self, state: _ForwardState, hidden: torch.Tensor) -> torch.Tensor:
        """Flat positions of the served tokens, in sequence order; the merged features are aligned with them."""
        if state.positions is None:
            positions, visual = [], []
            for modality, features in state.features.items():
                if modality not in state.masks:
                    raise RuntimeError(
                        f"the manager's {modality} features were captured but HF's {modality} mask was not"
                    )
                found = state.masks[modality].reshape(-1).nonzero().squeeze(1).to(hidden.device)
                managed = state.managed.get(modality)
                rows = state.rows.get(modality)
                if managed is not None:
                    count, what = managed.numel(), "visual tokens (served or not)"
                elif rows is None:
                    first = features if isinstance(features, torch.Tensor) else next(iter(features.values()))
                    count, what = first.shape[0], "tokens"
                else:
                    count, what = rows.numel(), "tokens"
                if found.numel() != count:
                    raise RuntimeError(
                        f"the manager has features of {count} {modality} {what} but the sequence holds "
                        f"{found.numel()} {modality} placeholder tokens"
                    )
                visual.append(found)
                positions.append(found if managed is None else found[managed.to(found.device)])
            if len(positions) == 1:
                state.positions = positions[0]
            else:  # images and videos: one sequence order
                merged = torch.cat(positions)
                state.order = torch.argsort(merged)
                state.positions = merged[state.order]
            if state.managed:  # an adaptive manager's fallback query is every visual token, served or not
                state.visual_positions = torch.sort(torch.cat(visual)).values
        return state.positions

    def _adaptive_delta(
        self,
        layer: int,
        state: _ForwardState,
        experts: torch.Tensor,
        flat: torch.Tensor,
        positions: torch.Tensor,
        batch_seq: torch.Size,
    ) -> torch.Tensor:
        """The adaptive manager on the managed tokens of every sample as one flat row: no padding, no copies of the
        features; each token reads its own sample's query tokens through a per-token query mask."""
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
        each served token reads."""
        device = positions.device
        visual = torch.zeros(batch_size * seq_len, dtype=torch.bool, device=device)
        visual[positions if state.visual_positions is None else state.visual_positions] = True
        visual = visual.view(batch_size, seq_len)
        if state.query_mask is None:
            query, fallback = visual, torch.ones(batch_size, dtype=torch.bool, device=device)
        else:
            if state.query_mask.shape != (batch_size, seq_len):
                raise ValueError(
                    f"{QUERY_MASK_KWARG} has shape {tuple(state.query_mask.shape)}: expected (batch, sequence) = "
                    f"({batch_size}, {seq_len})"
                )
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
        if not state.all_visual and bool((served & fallback).any()):
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
