"""`llava_ov_manager`: the lmms-eval model for HF LLaVA-family checkpoints (LLaVA-1.5, NeXT, NeXT-Video,
OneVision), with or without a manager."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm
from transformers import AutoProcessor

from llava_integration import (
    QUERY_MASK_KWARG,
    family_of,
    load_model,
    manager_of,
    prepare_inputs,
    prompt_query,
    set_image_aspect_ratio,
)
from llava_integration.processing import image_mode_of
from llava_integration.query import instruction_query_mask
from llava_manager.cli import quiet_libraries
from llava_manager.models import check_model_reference

from .generation import GenerationSettings
from .likelihood import continuation_scores
from .prompting import chat_prompt, request_media

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
GRID_SWITCH = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}
GRID_ASPECT_RATIO = "anyres_max_9"  # the paper's grid setting, used when a square checkpoint is evaluated with grids
quiet_libraries()  # lmms-eval runs this model in its own process, outside the llava-manager commands


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A torch dtype from its name; "auto" is bfloat16 on GPUs and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_grid(grid: bool | str | None) -> bool | None:
    """The `grid` model argument as True (AnyRes grids), False (square images) or None (the checkpoint's choice)."""
    if grid is None or isinstance(grid, bool):
        return grid
    if str(grid).lower() not in GRID_SWITCH:
        raise ValueError(f"grid={grid!r}: expected true or false (on/off)")
    return GRID_SWITCH[str(grid).lower()]


class LlavaOvManager(lmms):
    """A LLaVA-family model (+ manager) through HF transformers: batched generation, log-likelihoods, multi-image
    documents, and video documents on NeXT-Video and OneVision. Any class `llava_integration.FAMILIES` lists; `grid`
    applies to LLaVA-OneVision only.

    Model arguments (`--model_args`): `pretrained` (a merged checkpoint or a base model), `manager` (an adapter
    directory to apply), `dtype` (auto, float32, bfloat16, float16), `attn_implementation` (sdpa, eager,
    flash_attention_2), `grid` (true: AnyRes grids, false: square images; default: the checkpoint's config),
    `max_new_tokens` (an upper bound on every task's answer length), `max_frames` (frames sampled per video, 8),
    `device`. The batch size is lmms-eval's
    `--batch_size`.

    `loglikelihood` returns the negative log-likelihood: lmms-eval 0.7.3 picks the multiple-choice answer with the
    LOWEST score, and it reaches the task as numbers only inside a `GenerationResult` (plain tuples are turned into
    their string form by its evaluator).
    """

    def __init__(
        self,
        pretrained: str,
        manager: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        grid: bool | str | None = None,
        max_new_tokens: int | None = None,
        max_frames: int | str = 8,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # passed by lmms-eval; only meaningful with batch_size=auto
        **unexpected: Any,
    ) -> None:
        super().__init__()
        if unexpected:
            raise ValueError(
                f"unknown model_args for llava_ov_manager: {sorted(unexpected)}; expected pretrained, manager, device, "
                "dtype, attn_implementation, grid, max_new_tokens, max_frames (and lmms-eval's --batch_size)"
            )
        if str(batch_size).startswith("auto"):
            raise ValueError("llava_ov_manager needs a fixed --batch_size N, not 'auto'")
        for key, value in (("pretrained", pretrained), ("manager", manager)):
            if value is not None:
                check_model_reference(str(value), f"llava_ov_manager {key}=")  # at once, not after hub retries
        self.batch_size_per_device = int(batch_size)
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.max_frames = int(max_frames)
        if self.max_frames < 1:
            raise ValueError(f"max_frames={max_frames}: expected a positive number of frames per video")

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size > 1:
            self._device = torch.device(f"cuda:{self.accelerator.local_process_index}")
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        dtype = resolve_dtype(dtype, self._device)
        grid = resolve_grid(grid)
        self._model = load_model(pretrained, manager=manager, dtype=dtype, attn_implementation=attn_implementation)
        self._model.to(self._device).eval()
        if grid is not None:
            if not family_of(self._model)[0].square_images:
                raise ValueError(
                    f"grid={grid}: {type(self._model).__name__} has one image mode (its own); grid switches "
                    "LLaVA-OneVision between AnyRes grids and square images"
                )
            current = self._model.config.vision_aspect_ratio
            keep = grid and current.startswith("anyres_max_")
            set_image_aspect_ratio(self._model, current if keep else (GRID_ASPECT_RATIO if grid else "square"))
        self.image_aspect_ratio = image_mode_of(self._model)
        self._takes_videos = family_of(self._model)[0].videos

        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:  # batches need one; it never reaches an unmasked position
            self.tokenizer.pad_token = self.tokenizer.eos_token
        managers = manager_of(self._model)
        self._reads_query = managers is not None and any(
            getattr(manager, "query_type", None) for manager in managers.managers
        )
        managers = manager_of(self._model)
        logger.info(
            f"llava_ov_manager: {pretrained} (+ adapter {manager})" if manager else f"llava_ov_manager: {pretrained}"
        )
        logger.info(
            f"  manager {managers.config if managers is not None else 'none'}, images {self.image_aspect_ratio}, "
            f"{dtype}, {self._device}, batch size {self.batch_size_per_device}"
        )

    # -- what lmms-eval reads ----------------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # -- requests -----------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to `requests`, generated in batches of requests that share their task's generation settings."""
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_ov_manager generate")
        for batch in self._batches(
            requests, key=lambda request: json.dumps(request.args[1], sort_keys=True, default=str)
        ):
            settings = GenerationSettings.from_task(requests[batch[0]].args[1], self.max_new_tokens)
            prompts, images, videos = self._prompts_and_media([requests[index] for index in batch])
            inputs = self._encode(prompts, images, videos)
            query_mask = self._query_mask(inputs["input_ids"], inputs["attention_mask"])
            with torch.inference_mode(), prompt_query(self._model, query_mask):
                output = self._model.generate(
                    **inputs,
                    **settings.generate_kwargs(),
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for index, text in zip(batch, texts):
                answers[index] = settings.cut(text)
            progress.update(len(batch))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """For each request, `(negative log-likelihood of the continuation, whether greedy decoding gives it)`.

        The requests of one document (its choices) share one prompt: its images and the manager's features are
        encoded once, and its KV cache serves every choice. Batches hold `batch_size` documents.
        """
        unconditional = [request for request in requests if len(request.args) != 6]
        if unconditional:
            raise ValueError(
                f"{unconditional[0].task_name}: llava_ov_manager scores continuations of a document's prompt; "
                "unconditional requests (the acc_mutual_info metric) are not supported"
            )
        prompts: dict[tuple, list[int]] = {}  # (task, split, doc_id, context) -> its requests, in order
        for index, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            prompts.setdefault((task, split, doc_id, context), []).append(index)
        groups = list(prompts.values())
        scores: list[GenerationResult | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_ov_manager loglikelihood")
        firsts = [requests[group[0]] for group in groups]
        for batch in self._batches(firsts, key=lambda request: ""):
            prompt_texts, images, videos = self._prompts_and_media([firsts[g] for g in batch])
            inputs = self._encode(prompt_texts, images, videos)
            query_mask = self._query_mask(inputs["input_ids"], inputs["attention_mask"])
            extra = {} if query_mask is None else {QUERY_MASK_KWARG: query_mask}
            rows = [(slot, index) for slot, g in enumerate(batch) for index in groups[g]]
            continuations = [
                self.tokenizer(self._continuation(requests[index]), add_special_tokens=False)["input_ids"]
                for _, index in rows
            ]
            loglikelihood, greedy = continuation_scores(
                self._model, inputs, [slot for slot, _ in rows], continuations, self.tokenizer.pad_token_id, **extra
            )
            for (_, index), value, is_greedy in zip(rows, loglikelihood.tolist(), greedy.tolist()):
                scores[index] = GenerationResult(text=(-value, bool(is_greedy)))
            progress.update(len(rows))
        progress.close()
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("llava_ov_manager does not run multi-round generation tasks")

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], key: Callable[[Instance], str]) -> Iterator[list[int]]:
        """Request indices in batches that share `key`, longest context first (less padding, OOM shows early)."""
        order = sorted(range(len(requests)), key=lambda index: (key(requests[index]), -len(requests[index].args[0])))
        for _, group in itertools.groupby(order, key=lambda index: key(requests[index])):
            group = list(group)
            for start in range(0, len(group), self.batch_size_per_device):
                yield group[start : start + self.batch_size_per_device]

    def _document(self, request: Instance) -> dict:
        *_, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _prompts_and_media(self, requests: list[Instance]) -> tuple[list[str], list[list], list[list]]:
        prompts, images, videos = [], [], []
        for request in requests:
            context, doc_to_visual = request.args[0], request.args[2]
            where = f"task {request.task_name} document {request.doc_id}"
            media = request_media(doc_to_visual(self._document(request)), where, self.max_frames)
            if media.videos and not self._takes_videos:
                raise ValueError(f"{where} holds a video, but {type(self._model).__name__} takes no videos")
            prompts.append(chat_prompt(self.processor, context, len(media.images), where, len(media.videos)))
            images.append(media.images)
            videos.append(media.videos)
        return prompts, images, videos

    def _continuation(self, request: Instance) -> str:
        target = request.args[1]
        return target if isinstance(target, str) else target(self._document(request))

    def _encode(self, prompts: list[str], images: list[list], videos: list[list]) -> dict[str, Any]:
        inputs = prepare_inputs(self.processor, prompts, images, self.image_aspect_ratio, videos=videos)
        encoded = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self._device, self._model.dtype if torch.is_floating_point(value) else None)
            if value is not None:
                encoded[name] = value
        return encoded

    def _query_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The instruction tokens, for managers that read them as their query (adaptive_last/average/cross)."""
        if not self._reads_query:
            return None
        # The prompts were rendered with the processor's template (LLaVA-1.5 and NeXT keep theirs there).
        template = getattr(self.processor, "chat_template", None)
        return instruction_query_mask(input_ids, self.tokenizer, attention_mask, chat_template=template)
