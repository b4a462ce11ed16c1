"""The hooks that run a manager inside an HF LLaVA-family model, installed and removed as one unit.

One runtime serves every family in `families.py`; the family entry says where the seams are. One forward of the
patched model:
1. a pre-hook on the model opens a `_ForwardState` when the call carries images or videos (prefill only: decode
   steps of `generate` carry none, so the KV-cache path is untouched);
2. the wrapped `get_image_features` (and `get_video_features`) asks the vision tower for the main layer *and* the
   manager's layers in the same pass, projects the manager's layers with the model's projector, adds the layer
   embedding and packs (images) or pools (video frames) them like the main feature (`features.py`);
3. the wrapped `get_placeholder_mask` records the exact masks HF scatters the visual tokens into;
4. a pre-hook on each injection decoder layer adds the manager's output at those positions, for the whole batch at
   once; after the last injection layer the per-layer features are released;
5. a post-hook on the model drops the state, also when the forward raised.

The same runtime also serves LLaVA-OneVision's square images (no grid): each image is its base view, `T` tokens, no
newline token.
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
    project_layers,
    stack_layers,
    video_features,
)

QUERY_MASK_KWARG = "manager_query_mask"
MODALITY_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}
# Arguments of `get_image_features` that only some families take; passed on only to those that do.
_IMAGE_EXTRAS = ("image_sizes", "vision_aspect_ratio", "batch_num_images")


@dataclass
class ImageFeaturesWithManager(BaseModelOutputWithPooling):
    """`get_image_features`' (or `get_video_features`') output plus the manager's per-layer features of its tokens.

    HF generation encodes images and videos before the prefill forward and then expands (beam search) and slices
    (chunked prefill) `deepstack_features`, token-aligned with `pooler_output`. The manager's features ride along
    under that name: one entry holding, per image (video), `(tokens, N * D)` with the N vision layers folded into
    the channels.
    """

    deepstack_features: list[list[torch.Tensor]] | None = None


@dataclass
class _PaddedLayout:
    """Where the managed tokens (flat order) sit in a per-sample padded batch `(B, L_max)`."""

    sample: torch.Tensor
    rank: torch.Tensor
    batch_size: int
    max_len: int

    @classmethod
    def from_positions(cls, positions: torch.Tensor, seq_len: int, batch_size: int) -> _PaddedLayout:
        sample = positions // seq_len
        counts = torch.bincount(sample, minlength=batch_size)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(positions.numel(), device=positions.device) - starts[sample]
        max_len = int(counts.max()) if positions.numel() else 0
        return cls(sample, rank, batch_size, max_len)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        padded = rows.new_zeros((self.batch_size, self.max_len, *rows.shape[1:]))
        padded[self.sample, self.rank] = rows
        return padded

    def valid(self) -> torch.Tensor:
        mask = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=self.sample.device)
        mask[self.sample, self.rank] = True
        return mask

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded[self.sample, self.rank]


@dataclass
class _ForwardState:
    pending_layers: set[int]
    query_mask: torch.Tensor | None = None
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (V_m, N, D) in placeholder order
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (B, T) placeholder mask
    experts: torch.Tensor | None = None  # (V, N, D): every managed token in sequence order; zero where unmanaged
    positions: torch.Tensor | None = None  # (V,) flat indices into B * T
    padded: dict = field(default_factory=dict)  # adaptive managers: the padded layout and padded experts


class ManagerRuntime:
    """Owns every hook and wrapper put on one inner LLaVA-family model; `uninstall` restores it exactly."""

    def __init__(self, model: nn.Module, family: ModelFamily) -> None:
        self.model = model
        self.family = family
        self.managers: LayerManagers | None = None
        self._state: _ForwardState | None = None
        self._model_handles: list = []
        self._layer_handles: list = []
        self._replaced: dict[str, object] = {}
        self._original = {}
        self._image_extras: list[str] = []  # the `_IMAGE_EXTRAS` the wrapped get_image_features takes

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

    # -- one forward ---------------------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        query_mask = kwargs.pop(QUERY_MASK_KWARG, None)
        self._state = None
        if self.managers is None:
            return args, kwargs
        state = _ForwardState(set(self.managers.config.injection_layers), query_mask=query_mask)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        raw = {"image": kwargs.get("pixel_values", args[1] if len(args) > 1 else None)}
        raw["video"] = kwargs.get("pixel_values_videos")
        opened = False
        for modality in self.managed_modalities():
            if encoded.get(modality) is not None:  # generate() encoded them before this prefill forward
                carried = getattr(encoded[modality], "deepstack_features", None)
                if carried is None:
                    raise ValueError(
                        f"precomputed mm_encoder_outputs[{modality!r}] lack the manager's features: compute them with "
                        f"this patched model's get_{modality}_features, or pass {MODALITY_INPUTS[modality]}"
                    )
                hidden = self.managers.config.hidden_size
                state.captured[modality] = torch.cat(carried[0], dim=0).view(
                    -1, len(self.managers.config.vision_layers), hidden
                )
                opened = True
            opened = opened or raw[modality] is not None
        if opened:
            self._state = state
        return args, kwargs

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
        if manager_layers and kwargs.get("output_hidden_states") is not True:
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
        experts, lengths = self._manager_features(
            outputs.hidden_states, image_sizes, batch_num_images, strategy, aspect
        )
        if self._state is not None:
            self._state.captured["image"] = experts
        folded = experts.view(experts.shape[0], -1)
        return ImageFeaturesWithManager(**outputs, deepstack_features=[list(torch.split(folded, lengths))])

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
        if manager_layers and kwargs.get("output_hidden_states") is not True:
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
        if self._state is not None:
            self._state.captured["video"] = experts
        folded = experts.view(experts.shape[0], -1)
        return ImageFeaturesWithManager(**outputs, deepstack_features=[list(torch.split(folded, lengths))])

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
    ) -> tuple[torch.Tensor, list[int]]:
        """`(V, N, D)` features of every image token and the tokens per image; zero at unmanaged tokens."""
        config = self.managers.config
        projector = self.family.part(self.model, "projector")
        projected = project_layers(projector, hidden_states, config.vision_layers, strategy)
        experts = self.managers.layer_embedding(projected)
        family = self.family
        crops = family.crops(self.model.config, projected.shape[0], image_sizes, batch_num_images, aspect)
        pack = None
        if family.pack is not None and not (aspect == SQUARE and family.square_images):
            pack = partial(family.pack, self.model, strategy=strategy, image_mode=aspect)
        experts, lengths = pack_like_main_feature(self.model, experts, image_sizes, crops, pack)
        managed = grid_selection(lengths, projected.shape[1], config.grid_type, experts.device)
        if managed is not None:
            # Zeroed features give an exactly zero delta there, and keep the features token-aligned for generate().
            experts = experts * managed[:, None, None].to(experts.dtype)
        return experts, lengths

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
        if state is None or (state.experts is None and not state.captured):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = self._positions(state, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.managers.needs_state and layer != 0:
            delta = self._adaptive_delta(layer, state, flat, positions, hidden.shape[:2])
        else:
            delta = self.managers(layer, state.experts)
        updated = flat.index_add(0, positions, delta.to(hidden.dtype)).view_as(hidden)

        state.pending_layers.discard(layer)
        if not state.pending_layers:  # the last injection layer: free the per-layer features now
            state.experts = None
            state.padded = {}
        if args:
            return (updated, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": updated}

    def _positions(self, state: _ForwardState, hidden: torch.Tensor) -> torch.Tensor:
        """Flat positions of the managed tokens, in sequence order; `state.experts` is aligned with them."""
        if state.positions is None:
            positions, experts = [], []
            for modality, features in state.captured.items():
                if modality not in state.masks:
                    raise RuntimeError(
                        f"the manager's {modality} features were captured but HF's {modality} mask was not"
                    )
                found = state.masks[modality].reshape(-1).nonzero().squeeze(1)
                if found.numel() != features.shape[0]:
                    raise RuntimeError(
                        f"the manager packed {features.shape[0]} {modality} tokens but the sequence holds "
                        f"{found.numel()} {modality} placeholder tokens"
                    )
                positions.append(found.to(hidden.device))
                experts.append(features)
            if len(positions) == 1:
                state.positions, state.experts = positions[0], experts[0]
            else:  # images and videos: one sequence order, as the padded layout of adaptive managers needs
                merged = torch.cat(positions)
                order = torch.argsort(merged)
                state.positions, state.experts = merged[order], torch.cat(experts)[order.to(experts[0].device)]
            state.captured = {}
        return state.positions

    def _adaptive_delta(
        self, layer: int, state: _ForwardState, flat: torch.Tensor, positions: torch.Tensor, batch_seq: torch.Size
    ) -> torch.Tensor:
        batch_size, seq_len = batch_seq
        if not state.padded:
            layout = _PaddedLayout.from_positions(positions, seq_len, batch_size)
            query_positions = self._query_positions(state, positions, batch_size, seq_len, flat.device)
            query_layout = _PaddedLayout.from_positions(query_positions, seq_len, batch_size)
            state.padded = {
                "layout": layout,
                "experts": layout.pad(state.experts),
                "query_layout": query_layout,
                "query_positions": query_positions,
                "query_valid": query_layout.valid(),
            }
        padded = state.padded
        layout, query_layout = padded["layout"], padded["query_layout"]
        out = self.managers(
            layer,
            padded["experts"],
            state=layout.pad(flat[positions]),
            query=query_layout.pad(flat[padded["query_positions"]]),
            query_mask=padded["query_valid"],
        )
        return layout.unpad(out)

    @staticmethod
    def _query_positions(
        state: _ForwardState, positions: torch.Tensor, batch_size: int, seq_len: int, device: torch.device
    ) -> torch.Tensor:
        """Flat positions of each sample's query tokens; a sample with none uses its managed visual tokens."""
        managed = torch.zeros(batch_size * seq_len, dtype=torch.bool, device=device)
        managed[positions] = True
        managed = managed.view(batch_size, seq_len)
        if state.query_mask is None:
            query = managed
        else:
            query = state.query_mask.to(device=device, dtype=torch.bool)
            if query.shape != (batch_size, seq_len):
                raise ValueError(
                    f"{QUERY_MASK_KWARG} has shape {tuple(query.shape)}: expected (batch, sequence) = "
                    f"({batch_size}, {seq_len})"
                )
            query = torch.where(query.any(dim=1, keepdim=True), query, managed)
        return query.reshape(-1).nonzero().squeeze(1)
