"""Start a ManagerTower from pre-trained uni-modal encoders (RoBERTa + CLIP), as the reference's pre-training does."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, RobertaModel

from .configuration_managertower import ManagerTowerConfig


def resize_position_embedding(weight: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Bicubic resize of a ViT position table `(1 + G*G, D)` (class position first) to `num_positions` rows."""
    grid_before = round((weight.shape[0] - 1) ** 0.5)
    grid_after = round((num_positions - 1) ** 0.5)
    if grid_before**2 + 1 != weight.shape[0] or grid_after**2 + 1 != num_positions:
        raise ValueError(f"cannot resize {weight.shape[0]} positions to {num_positions}: expected 1 + a square grid")
    if grid_before == grid_after:
        return weight
    patches = weight[1:].reshape(1, grid_before, grid_before, -1).permute(0, 3, 1, 2).float()
    patches = torch.nn.functional.interpolate(
        patches, size=(grid_after, grid_after), mode="bicubic", align_corners=False
    )
    patches = patches.permute(0, 2, 3, 1).reshape(grid_after * grid_after, -1).to(weight.dtype)
    return torch.cat((weight[:1], patches), dim=0)


def load_unimodal_encoders(model_class, text_model_path: str, vision_model_path: str, config: ManagerTowerConfig):
    """`model_class(config)` with its text and vision encoders loaded from the two checkpoints."""
    text = RobertaModel.from_pretrained(text_model_path, add_pooling_layer=False)
    vision = CLIPVisionModel.from_pretrained(vision_model_path)
    image_size = config.vision_config.image_size
    vision_config = CLIPVisionConfig(**{**vision.config.to_dict(), "image_size": image_size})
    config = ManagerTowerConfig(
        **{**config.to_dict(), "text_config": text.config.to_dict(), "vision_config": vision_config.to_dict()}
    )
    model = model_class(config)
    model.text_model.load_state_dict(text.state_dict())
    vision_state = vision.state_dict()
    key = "embeddings.position_embedding.weight"
    num_positions = model.vision_model.embeddings.num_positions
    vision_state[key] = resize_position_embedding(vision_state[key], num_positions)
    model.vision_model.load_state_dict(vision_state)
    return model


def set_image_size(model, image_size: int) -> None:
    """Change a ManagerTower's input resolution in place: CLIP's position table is resized (bicubic), as the
    reference does when fine-tuning at a higher resolution than pre-training."""
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    vision = model.vision_model
    config = CLIPVisionConfig(**{**vision.config.to_dict(), "image_size": image_size})
    ManagerTowerConfig(**{**model.config.to_dict(), "vision_config": config.to_dict()})  # validate before changing
    old = vision.embeddings
    new = CLIPVisionEmbeddings(config).to(device=old.class_embedding.device, dtype=old.class_embedding.dtype)
    state = old.state_dict()
    state["position_embedding.weight"] = resize_position_embedding(
        state["position_embedding.weight"], new.num_positions
    )
    new.load_state_dict(state)
    vision.embeddings = new
    vision.config.image_size = image_size  # the same object as model.config.vision_config
