"""`ManagerTowerModel`: RoBERTa and CLIP encoders, a manager per cross-modal layer and modality, cross-modal layers.

The data path: `encode_text` / `encode_image` run the uni-modal encoders and project their top N layers (the
experts) to the cross-modal width; `fuse` adds modality-type and layer embeddings, then for each cross-modal layer
lets the text and image managers build its inputs and runs the text and image cross-modal layers in parallel.
The cross-modal layers, poolers and MLM/ITM heads are HF BridgeTower's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BridgeTowerConfig, CLIPVisionModel, PreTrainedModel, RobertaModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bridgetower.configuration_bridgetower import BridgeTowerTextConfig
from transformers.models.bridgetower.modeling_bridgetower import (
    BridgeTowerBertCrossLayer,
    BridgeTowerMLMHead,
    BridgeTowerPooler,
)
from transformers.utils import ModelOutput

from ..stack import LayerEmbedding
from .configuration_managertower import ManagerTowerConfig
from .managers import MANAGER_TOWER_TYPES, AdaptiveAggregation, StaticAggregation, build_managers


@dataclass
class UnimodalEncoding(ModelOutput):
    r"""
    experts (`torch.Tensor` of shape `(batch_size, sequence_length, num_managed_layers, hidden_size)`):
        The top uni-modal layers projected to the cross-modal width (before type and layer embeddings).
    last_hidden_state (`torch.Tensor` of shape `(batch_size, sequence_length, encoder_hidden_size)`):
        The last uni-modal layer (after the shared `post_layernorm` for images): the input of the ITC heads.
    attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`):
        1 for real tokens, 0 for padding (for images: 0 for the patches of padding only, from `pixel_mask`).
    hidden_states (`tuple(torch.Tensor)`, *optional*):
        Every uni-modal hidden state, embeddings first, when asked for.
    """

    experts: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ManagerTowerModelOutput(ModelOutput):
    r"""
    text_features (`torch.Tensor` of shape `(batch_size, text_sequence_length, hidden_size)`):
        The text output of the last cross-modal layer.
    image_features (`torch.Tensor` of shape `(batch_size, image_sequence_length, hidden_size)`):
        The image output of the last cross-modal layer.
    pooler_output (`torch.Tensor` of shape `(batch_size, 2 * hidden_size)`):
        The pooled text and image first tokens, concatenated.
    hidden_states (`tuple` of three tuples, *optional*):
        As HF BridgeTower: the text hidden states, the image hidden states (batch first here) and a
        `(text, image)` pair per cross-modal layer.
    """

    text_features: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple | None = None


class ManagerTowerPreTrainedModel(PreTrainedModel):
    config_class = ManagerTowerConfig
    base_model_prefix = "managertower"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ("RobertaLayer", "CLIPEncoderLayer", "BridgeTowerBertCrossLayer")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding N(0, 0.02), LayerNorms (ExpertLayerNorm included) 1 and 0
        std = self.config.initializer_range
        if isinstance(module, LayerEmbedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, StaticAggregation):
            init.constant_(module.layer_scores, 1.0 / module.num_experts)
            init.constant_(module.temperature, float(self.config.manager_temperature))
            if module.previous_scale is not None:
                init.ones_(module.previous_scale)
        elif isinstance(module, AdaptiveAggregation):
            init.constant_(module.temperature, float(self.config.manager_temperature))
            init.ones_(module.previous_scale)
        elif isinstance(module, BridgeTowerMLMHead):
            init.zeros_(module.bias)


def _cross_layer_config(config: ManagerTowerConfig) -> BridgeTowerTextConfig:
    """The config HF's `BridgeTowerBertCrossLayer` reads: the cross-modal sizes of `config`."""
    cross = BridgeTowerTextConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.cross_modal_layer_norm_eps,
    )
    cross._attn_implementation = config._attn_implementation
    return cross


def _cross_layer(config: BridgeTowerTextConfig) -> BridgeTowerBertCrossLayer:
    layer = BridgeTowerBertCrossLayer(config)
    # HF marks this self-attention causal; that only matters to SDPA when no mask is given (the image stream, or
    # unpadded text), where it would wrongly hide later tokens. Cross-modal self-attention is bidirectional.
    layer.attention.self.is_causal = False
    return layer


def image_patch_mask(pixel_mask: torch.Tensor, pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor | None:
    """(B, 1 + patches) 1/0 mask of the image tokens (class token first) from a (B, H, W) pixel mask (1 = image,
    0 = padding, as BridgeTower's); a patch holding any image pixel is kept. None when nothing is padded."""
    expected = (pixel_values.shape[0], *pixel_values.shape[-2:])
    if tuple(pixel_mask.shape) != expected:
        raise ValueError(
            f"pixel_mask of shape {tuple(pixel_mask.shape)} does not fit pixel_values of shape "
            f"{tuple(pixel_values.shape)}: expected {expected} (1 = image pixel, 0 = padding)"
        )
    if bool(pixel_mask.all()):
        return None
    patches = F.max_pool2d(pixel_mask[:, None].float(), patch_size).flatten(1)
    return torch.cat((patches.new_ones(patches.shape[0], 1), patches), dim=1).long()


def grow_token_types(weight: torch.Tensor, num_token_types: int) -> torch.Tensor:
    """A (num_token_types, D) table: the rows of `weight`, then copies of its image row (type 1)."""
    if num_token_types < weight.shape[0]:
        raise ValueError(f"cannot shrink {weight.shape[0]} token types to {num_token_types}")
    extra = weight[1:2].expand(num_token_types - weight.shape[0], -1)
    return torch.cat((weight, extra), dim=0)


class ManagerTowerModel(ManagerTowerPreTrainedModel):
    """The bare ManagerTower: uni-modal encoders, managers and cross-modal layers, outputs as HF BridgeTower's."""

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.text_model = RobertaModel(config.text_config, add_pooling_layer=False)
        self.vision_model = CLIPVisionModel(config.vision_config)
        # The shared expert projections: every managed layer of a modality goes through the same Linear.
        self.cross_modal_text_transform = nn.Linear(config.text_config.hidden_size, hidden)
        self.cross_modal_image_transform = nn.Linear(config.vision_config.hidden_size, hidden)
        self.token_type_embeddings = nn.Embedding(config.num_token_types, hidden)
        with_layer_embedding = MANAGER_TOWER_TYPES[config.manager_type].layer_embedding
        self.text_layer_embedding = LayerEmbedding(config.num_managed_layers, hidden) if with_layer_embedding else None
        self.image_layer_embedding = LayerEmbedding(config.num_managed_layers, hidden) if with_layer_embedding else None
        self.cross_modal_text_managers = build_managers(config)
        self.cross_modal_image_managers = build_managers(config)
        # `manager_query_mask` follows the reference for text padding (image managers query the text stream). The
        # text managers query the image stream, whose padding (from `pixel_mask`) the reference never had: always
        # masked, which changes nothing on unpadded images.
        for manager in self.cross_modal_text_managers:
            if isinstance(manager, AdaptiveAggregation):
                manager.mask_query = True
        self.cross_layer_config = _cross_layer_config(config)
        self.cross_modal_text_layers = nn.ModuleList(
            _cross_layer(self.cross_layer_config) for _ in range(config.num_hidden_layers)
        )
        self.cross_modal_image_layers = nn.ModuleList(
            _cross_layer(self.cross_layer_config) for _ in range(config.num_hidden_layers)
        )
        self.cross_modal_text_pooler = BridgeTowerPooler(config)
        self.cross_modal_image_pooler = BridgeTowerPooler(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    @classmethod
    def from_bridgetower(cls, bridgetower: PreTrainedModel, config: ManagerTowerConfig | None = None):
        """A ManagerTower in `bridge` mode carrying the weights of an HF `BridgeTowerModel` (or of a model holding
        one as `.bridgetower`); `config`, if given, must describe the same shapes."""
        from .bridgetower import config_from_bridgetower, state_dict_from_bridgetower

        bridgetower = getattr(bridgetower, "bridgetower", bridgetower)
        if not isinstance(getattr(bridgetower, "config", None), BridgeTowerConfig):
            raise TypeError(f"expected an HF BridgeTowerModel, got {type(bridgetower).__name__}")
        config = config_from_bridgetower(bridgetower.config, config)
        parameter = next(bridgetower.parameters())
        model = cls(config).to(device=parameter.device, dtype=parameter.dtype)
        model.load_state_dict(state_dict_from_bridgetower(bridgetower.state_dict()), strict=True)
        return model.train(bridgetower.training)

    @classmethod
    def from_unimodal_pretrained(
        cls, text_model_path: str, vision_model_path: str, config: ManagerTowerConfig | None = None
    ):
        """A ManagerTower whose encoders are loaded from a RoBERTa and a CLIP checkpoint (the pre-training start).

        `config` (default: ManagerTower-base) sets everything else; the encoder configs are taken from the
        checkpoints, and CLIP's position embeddings are resized (bicubic) to `config.vision_config.image_size`.
        """
        from .unimodal import load_unimodal_encoders

        return load_unimodal_encoders(cls, text_model_path, vision_model_path, config or ManagerTowerConfig())

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> UnimodalEncoding:
        """Run the text encoder and project its top `num_managed_layers` layers."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        layers = torch.stack(outputs.hidden_states[-self.config.num_managed_layers :], dim=-2)
        return UnimodalEncoding(
            experts=self.cross_modal_text_transform(layers),
            last_hidden_state=outputs.last_hidden_state,
            attention_mask=attention_mask,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> UnimodalEncoding:
        """Run the vision encoder, apply its shared `post_layernorm` to its top layers and project them.

        `pixel_mask` (B, H, W): 1 on image pixels, 0 on padding (as from `ManagerTowerProcessor` or HF's
        BridgeTower processor). Patches of padding only are masked out of every attention over image tokens.
        """
        pixel_values = pixel_values.to(self.vision_model.dtype)
        patch_mask = None
        if pixel_mask is not None:
            patch_mask = image_patch_mask(pixel_mask, pixel_values, self.config.vision_config.patch_size)
        masks = {}
        if patch_mask is not None:
            masks["attention_mask"] = create_bidirectional_mask(
                config=self.vision_model.config,
                inputs_embeds=pixel_values.new_empty(pixel_values.shape[0], 1, 1),
                attention_mask=patch_mask,
            )
        outputs = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=True,
            **masks,
        )
        layers = torch.stack(outputs.hidden_states[-self.config.num_managed_layers :], dim=-2)
        layers = self.vision_model.post_layernorm(layers)
        if patch_mask is None:
            patch_mask = torch.ones(layers.shape[:2], dtype=torch.long, device=layers.device)
        return UnimodalEncoding(
            experts=self.cross_modal_image_transform(layers),
            last_hidden_state=layers[..., -1, :],
            attention_mask=patch_mask,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )

    def _embedded_experts(self, experts: torch.Tensor, token_type: int, layer_embedding: LayerEmbedding | None):
        experts = experts + self.token_type_embeddings.weight[token_type]
        return experts if layer_embedding is None else layer_embedding(experts)

    def fuse(
        self,
        text: UnimodalEncoding,
        image: UnimodalEncoding,
        image_token_type_idx: int = 1,
        output_hidden_states: bool = False,
    ) -> ManagerTowerModelOutput:
        """The cross-modal encoder over encoded text and images (same batch size)."""
        if not 1 <= image_token_type_idx < self.config.num_token_types:
            raise ValueError(
                f"image_token_type_idx {image_token_type_idx} out of range: the model has "
                f"{self.config.num_token_types} token types (0 = text, images 1..{self.config.num_token_types - 1})"
            )
        if text.experts.shape[0] != image.experts.shape[0]:
            raise ValueError(f"fusing {text.experts.shape[0]} texts with {image.experts.shape[0]} images")
        text_experts = self._embedded_experts(text.experts, 0, self.text_layer_embedding)
        image_experts = self._embedded_experts(image.experts, image_token_type_idx, self.image_layer_embedding)
        # A (B, 1, 1, L) padding mask: one query row broadcasts over every query of either stream.
        text_mask = create_bidirectional_mask(
            config=self.cross_layer_config, inputs_embeds=text_experts[:, :1, 0], attention_mask=text.attention_mask
        )
        image_mask = None  # images are rarely padded: no mask at all then, as HF BridgeTower
        if not bool(image.attention_mask.all()):
            image_mask = create_bidirectional_mask(
                config=self.cross_layer_config,
                inputs_embeds=image_experts[:, :1, 0],
                attention_mask=image.attention_mask,
            )
        text_state = image_state = None
        cross_states = []
        for text_manager, image_manager, text_layer, image_layer in zip(
            self.cross_modal_text_managers,
            self.cross_modal_image_managers,
            self.cross_modal_text_layers,
            self.cross_modal_image_layers,
        ):
            text_input = text_manager(
                text_experts, previous=text_state, query=image_state, query_mask=image.attention_mask
            )
            image_input = image_manager(
                image_experts, previous=image_state, query=text_state, query_mask=text.attention_mask
            )
            text_state = text_layer(
                text_input, image_input, attention_mask=text_mask, encoder_attention_mask=image_mask
            )[0]
            image_state = image_layer(
                image_input, text_input, attention_mask=image_mask, encoder_attention_mask=text_mask
            )[0]
            cross_states.append((text_state, image_state))
        pooled = torch.cat((self.cross_modal_text_pooler(text_state), self.cross_modal_image_pooler(image_state)), -1)
        hidden_states = None
        if output_hidden_states:
            hidden_states = (text.hidden_states, image.hidden_states, tuple(cross_states))
        return ManagerTowerModelOutput(
            text_features=text_state, image_features=image_state, pooler_output=pooled, hidden_states=hidden_states
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        image_token_type_idx: int = 1,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
    ) -> ManagerTowerModelOutput:
        """`pixel_mask` (B, H, W), optional: 1 on image pixels, 0 on padding (BridgeTower's meaning)."""
        if pixel_values is None:
            raise ValueError("ManagerTowerModel needs pixel_values: it fuses a text with an image")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        text = self.encode_text(input_ids, attention_mask, output_hidden_states)
        image = self.encode_image(pixel_values, pixel_mask, interpolate_pos_encoding, output_hidden_states)
        return self.fuse(text, image, image_token_type_idx, output_hidden_states)


__all__ = ["ManagerTowerModel", "ManagerTowerModelOutput", "ManagerTowerPreTrainedModel", "UnimodalEncoding"]
