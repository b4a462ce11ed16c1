"""Task heads on `ManagerTowerModel`: pre-training (MLM + ITM), VQAv2, SNLI-VE, NLVR2 and image-text retrieval.

Head parameter names follow the reference (`mlm_score`, `itm_score`, `vqa_classifier`, ...), so the learning-rate
multipliers of the recipes select them by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerITMHead, BridgeTowerMLMHead
from transformers.utils import ModelOutput

from .configuration_managertower import ManagerTowerConfig
from .modeling_managertower import ManagerTowerModel, ManagerTowerPreTrainedModel, UnimodalEncoding, grow_token_types

if TYPE_CHECKING:
    from .retrieval import RetrievalRanking


def classification_head(in_features: int, hidden: int, num_labels: int) -> nn.Sequential:
    """The reference's two-layer task head: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_labels))


@dataclass
class ManagerTowerTaskOutput(ModelOutput):
    """Loss (when labels are given) and logits of a task head; `losses` per objective where there are several."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None


@dataclass
class ManagerTowerPreTrainingOutput(ModelOutput):
    """Total and per-objective losses, MLM logits over the vocabulary, ITM logits and the ITM labels used."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    mlm_logits: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    itm_labels: torch.Tensor | None = None


class ManagerTowerHeadModel(ManagerTowerPreTrainedModel):
    """A `ManagerTowerModel` (as `.managertower`) with a task head; `min_token_types` is what the head needs."""

    min_token_types = 2
    # The heads return mean losses: HF Trainer must scale them for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        if config.num_token_types < self.min_token_types:
            raise ValueError(
                f"{type(self).__name__} needs {self.min_token_types} token types, the config has "
                f"{config.num_token_types}: build it with from_base_model, which adds them"
            )
        self.managertower = ManagerTowerModel(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """As `PreTrainedModel.from_pretrained`; called on `ManagerTowerHeadModel` itself, loads the head class the
        directory was saved from (its config's `architectures`), for the heads HF has no Auto class for."""
        if cls is not ManagerTowerHeadModel:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        config = kwargs.get("config") or ManagerTowerConfig.from_pretrained(pretrained_model_name_or_path)
        heads = {head.__name__: head for head in TASK_HEADS.values()}
        saved = [name for name in config.architectures or [] if name in heads]
        if not saved:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds architectures {config.architectures}, not a ManagerTower head: "
                f"expected one of {sorted(heads)} (load a bare model with ManagerTowerModel)"
            )
        return heads[saved[0]].from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_base_model(cls, base: ManagerTowerModel, **config_overrides):
        """This head, newly initialised, on `base`'s weights (copied); `config_overrides` set head fields such as
        `num_labels`. Token types the head needs are added as the reference does (copies of the image type)."""
        config = copy.deepcopy(base.config)
        state = base.state_dict()
        if config.num_token_types < cls.min_token_types:
            key = "token_type_embeddings.weight"
            state[key] = grow_token_types(state[key], cls.min_token_types)
            config.num_token_types = cls.min_token_types
        for name, value in config_overrides.items():
            setattr(config, name, value)
        config.validate()
        parameter = next(base.parameters())
        model = cls(config).to(device=parameter.device, dtype=parameter.dtype)
        model.managertower.load_state_dict(state)
        return model


class ManagerTowerForPreTraining(ManagerTowerHeadModel):
    """Masked language modelling (on masked text) and image-text matching (half of the images swapped for false ones)."""

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        self.mlm_score = BridgeTowerMLMHead(config)
        self.mlm_score.transform.LayerNorm.eps = config.cross_modal_layer_norm_eps
        self.itm_score = BridgeTowerITMHead(2 * config.hidden_size)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        false_pixel_values: torch.Tensor | None = None,
        false_pixel_mask: torch.Tensor | None = None,
        itm_labels: torch.Tensor | None = None,
    ) -> ManagerTowerPreTrainingOutput:
        """MLM runs on `mlm_input_ids` (with `mlm_labels`, -100 = not masked) and the true images; ITM on the clean
        text with each image swapped for its false one where `itm_labels` is 0 (default: half of them, at random).
        Without labels nor false images: the MLM logits of `input_ids` and the ITM logits of the given pairs."""
        losses: dict[str, torch.Tensor] = {}
        mlm_logits = itm_logits = None
        if mlm_labels is None and false_pixel_values is None:
            fused = self.managertower(input_ids, attention_mask, pixel_values, pixel_mask=pixel_mask)
            return ManagerTowerPreTrainingOutput(
                mlm_logits=self.mlm_score(fused.text_features), itm_logits=self.itm_score(fused.pooler_output)
            )
        if mlm_labels is not None:
            if mlm_input_ids is None:
                raise ValueError("MLM needs mlm_input_ids (the masked text) with mlm_labels")
            fused = self.managertower(mlm_input_ids, attention_mask, pixel_values, pixel_mask=pixel_mask)
            mlm_logits = self.mlm_score(fused.text_features)
            losses["mlm"] = F.cross_entropy(mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100)
        if false_pixel_values is not None:
            if itm_labels is None:
                itm_labels = half_matched_labels(input_ids.shape[0], input_ids.device)
            matched = itm_labels.bool().view(-1, *([1] * (pixel_values.dim() - 1)))
            images = torch.where(matched, pixel_values, false_pixel_values)
            masks = None
            if pixel_mask is not None or false_pixel_mask is not None:
                true_mask = pixel_mask if pixel_mask is not None else torch.ones_like(false_pixel_mask)
                false_mask = false_pixel_mask if false_pixel_mask is not None else torch.ones_like(pixel_mask)
                masks = torch.where(matched[:, 0], true_mask, false_mask)
            fused = self.managertower(input_ids, attention_mask, images, pixel_mask=masks)
            itm_logits = self.itm_score(fused.pooler_output)
            losses["itm"] = F.cross_entropy(itm_logits, itm_labels.long())
        if not losses:
            raise ValueError("pre-training needs mlm_labels (with mlm_input_ids) and/or false_pixel_values")
        return ManagerTowerPreTrainingOutput(
            loss=sum(losses.values()),
            losses=losses,
            mlm_logits=mlm_logits,
            itm_logits=itm_logits,
            itm_labels=itm_labels,
        )


def half_matched_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    """ITM labels as in the reference: `batch_size // 2` matched pairs (1), the rest false (0), shuffled."""
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    labels[: batch_size // 2] = 1
    return labels[torch.randperm(batch_size, device=device)]


class ManagerTowerForVisualQuestionAnswering(ManagerTowerHeadModel):
    """VQAv2: a classifier over the answer vocabulary on the pooled features, BCE on soft scores times `num_labels`."""

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        width = 2 * config.hidden_size
        self.vqa_classifier = classification_head(width, width * config.head_hidden_scale, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ManagerTowerTaskOutput:
        """`labels`: (B, num_labels) soft answer scores in [0, 1]."""
        fused = self.managertower(input_ids, attention_mask, pixel_values, pixel_mask=pixel_mask)
        logits = self.vqa_classifier(fused.pooler_output)
        loss = None
        if labels is not None:
            # BCE summed over answers, as the reference (mean BCE times the answer-vocabulary size).
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)) * labels.shape[1]
        return ManagerTowerTaskOutput(loss=loss, logits=logits, labels=labels)


class ManagerTowerForVisualEntailment(ManagerTowerHeadModel):
    """SNLI-VE: 3-way classification (0 contradiction, 1 neutral, 2 entailment) of an image and a hypothesis."""

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        width = 2 * config.hidden_size
        self.snli_classifier = classification_head(width, width * config.head_hidden_scale, 3)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ManagerTowerTaskOutput:
        fused = self.managertower(input_ids, attention_mask, pixel_values, pixel_mask=pixel_mask)
        logits = self.snli_classifier(fused.pooler_output)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ManagerTowerTaskOutput(loss=loss, logits=logits, labels=labels)


class ManagerTowerForNLVR2(ManagerTowerHeadModel):
    """NLVR2: the text fused with each of two images (token types 1 and 2); a classifier on the 4D concatenation."""

    min_token_types = 3

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        width = 2 * config.hidden_size
        self.nlvr2_classifier_dropout = nn.Dropout(config.classifier_dropout)
        self.nlvr2_classifier = classification_head(2 * width, width * config.head_hidden_scale, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ManagerTowerTaskOutput:
        """`pixel_values`: (B, 2, C, H, W), the left and right image of each statement; `pixel_mask` (B, 2, H, W)."""
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"NLVR2 expects pixel_values of shape (B, 2, C, H, W), got {tuple(pixel_values.shape)}")
        if pixel_mask is not None and pixel_mask.dim() != 4:
            raise ValueError(f"NLVR2 expects pixel_mask of shape (B, 2, H, W), got {tuple(pixel_mask.shape)}")
        model = self.managertower
        text = model.encode_text(input_ids, attention_mask)
        images = model.encode_image(
            pixel_values.flatten(0, 1), None if pixel_mask is None else pixel_mask.flatten(0, 1)
        )
        pooled = []
        for index in range(2):
            image = UnimodalEncoding(experts=images.experts[index::2], attention_mask=images.attention_mask[index::2])
            pooled.append(model.fuse(text, image, image_token_type_idx=index + 1).pooler_output)
        logits = self.nlvr2_classifier(self.nlvr2_classifier_dropout(torch.cat(pooled, dim=-1)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ManagerTowerTaskOutput(loss=loss, logits=logits, labels=labels)


class ManagerTowerForImageTextRetrieval(ManagerTowerHeadModel):
    """Image-text contrastive learning on the uni-modal first tokens, plus ITM on hard negatives drawn from it.

    In training on several processes (`torch.distributed`), each process contrasts its samples with those of every
    process, as the reference (its all_gather with gradients): the ITC loss and gradients of R ranks x B samples are
    those of one process with R x B. Hard negatives come from the process's own samples, as the reference's default.
    Evaluation ranks by ITC, then re-ranks the top-k candidates by the ITM score (see `retrieval.py`).
    """

    def __init__(self, config: ManagerTowerConfig) -> None:
        super().__init__(config)
        self.itm_score = BridgeTowerITMHead(2 * config.hidden_size)
        self.cross_modal_itc_text_head = nn.Linear(config.text_config.hidden_size, config.contrastive_hidden_size)
        self.cross_modal_itc_image_head = nn.Linear(config.vision_config.hidden_size, config.contrastive_hidden_size)
        self.itc_temperature = nn.Parameter(torch.tensor(float(config.contrastive_temperature)))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.constant_(self.itc_temperature, self.config.contrastive_temperature)

    def text_embeddings(self, text: UnimodalEncoding) -> torch.Tensor:
        """L2-normalised ITC embeddings of encoded texts."""
        return F.normalize(self.cross_modal_itc_text_head(text.last_hidden_state[:, 0]), dim=-1)

    def image_embeddings(self, image: UnimodalEncoding) -> torch.Tensor:
        """L2-normalised ITC embeddings of encoded images."""
        return F.normalize(self.cross_modal_itc_image_head(image.last_hidden_state[:, 0]), dim=-1)

    def itm_logits(self, text: UnimodalEncoding, image: UnimodalEncoding) -> torch.Tensor:
        """ITM logits (B, 2) of text-image pairs; `[:, 1]` is the matching score used for re-ranking."""
        return self.itm_score(self.managertower.fuse(text, image).pooler_output)

    def rank(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        *,
        k: int = 16,
        batch_size: int = 64,
    ) -> RetrievalRanking:
        """The texts ranked for each image and the images for each text (see `retrieval.rank`)."""
        from .retrieval import rank

        return rank(self, input_ids, attention_mask, pixel_values, pixel_mask, k=k, batch_size=batch_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> ManagerTowerTaskOutput:
        """`image_ids` (B,) tell which captions share an image (they are all positives); default: all distinct."""
        batch = input_ids.shape[0]
        if image_ids is None:
            image_ids = torch.arange(batch, device=input_ids.device)
        text = self.managertower.encode_text(input_ids, attention_mask)
        image = self.managertower.encode_image(pixel_values, pixel_mask)
        with torch.no_grad():
            self.itc_temperature.clamp_(0.001, 0.5)
        text_embeds, image_embeds = self.text_embeddings(text), self.image_embeddings(image)
        all_text, all_image, all_ids, local = text_embeds, image_embeds, image_ids, slice(0, batch)
        if self.training and dist.is_initialized() and dist.get_world_size() > 1:
            (all_text, all_image, all_ids), local = gather_batches(text_embeds, image_embeds, image_ids)
        # Rows: this process's samples; columns: every process's (the global batch).
        logits_i2t = image_embeds @ all_text.t() / self.itc_temperature
        logits_t2i = text_embeds @ all_image.t() / self.itc_temperature
        positives = image_ids[:, None] == all_ids[None, :]
        targets = positives.to(logits_i2t.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        itc_loss = (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2

        own = positives[:, local]
        negative_images = sample_hard_negatives(logits_t2i[:, local], own)  # one image per text
        negative_texts = sample_hard_negatives(logits_i2t[:, local], own)  # one text per image
        pair_text = torch.cat((torch.arange(batch, device=input_ids.device).repeat(2), negative_texts))
        pair_image = torch.cat((torch.arange(batch, device=input_ids.device), negative_images))
        pair_image = torch.cat((pair_image, torch.arange(batch, device=input_ids.device)))
        itm_logits = self.itm_logits(select(text, pair_text), select(image, pair_image))
        itm_labels = torch.zeros(3 * batch, dtype=torch.long, device=input_ids.device)
        itm_labels[:batch] = 1
        itm_loss = F.cross_entropy(itm_logits, itm_labels)
        losses = {"itc": itc_loss, "itm": itm_loss}
        return ManagerTowerTaskOutput(loss=itc_loss + itm_loss, logits=itm_logits, losses=losses, labels=itm_labels)


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(logits) over the non-positive columns.

    A row with no negative at all (every candidate shares its image) falls back to a uniform draw, as the reference.
    """
    weights = torch.softmax(logits.float(), dim=-1).masked_fill(positives, 0)
    empty = weights.sum(dim=-1, keepdim=True) <= 0
    weights = torch.where(empty, torch.ones_like(weights), weights)
    return torch.multinomial(weights, 1).squeeze(-1)


class _GatherWithGradient(torch.autograd.Function):
    """All ranks' `(B_r, ...)` tensors concatenated; the gradient of each rank's slice is summed over the ranks (each
    rank's loss reads every slice), so averaging the parameters' gradients over ranks differentiates the global mean."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))  # all_gather needs one shape on every rank
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        gradient = gradient.contiguous().clone()
        dist.all_reduce(gradient)
        start = sum(ctx.sizes[: ctx.rank])
        return gradient[start : start + ctx.sizes[ctx.rank]], None


def gather_batches(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], slice]:
    """Every rank's batch of each tensor, concatenated in rank order (with gradients where the tensor has them), and
    the slice that holds this rank's own rows. Batches may differ in size across ranks."""
    first = tensors[0]
    size = torch.tensor([first.shape[0]], device=first.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(item) for item in sizes]
    start = sum(sizes[: dist.get_rank()])
    gathered = tuple(_GatherWithGradient.apply(tensor, sizes) for tensor in tensors)
    return gathered, slice(start, start + first.shape[0])


def select(encoding: UnimodalEncoding, index: torch.Tensor) -> UnimodalEncoding:
    """The encodings of the samples at `index` (experts and masks only: what `fuse` reads)."""
    return UnimodalEncoding(experts=encoding.experts[index], attention_mask=encoding.attention_mask[index])


TASK_HEADS: dict[str, type[ManagerTowerHeadModel]] = {
    "pretrain": ManagerTowerForPreTraining,
    "vqav2": ManagerTowerForVisualQuestionAnswering,
    "snli_ve": ManagerTowerForVisualEntailment,
    "nlvr2": ManagerTowerForNLVR2,
    "retrieval": ManagerTowerForImageTextRetrieval,
}
