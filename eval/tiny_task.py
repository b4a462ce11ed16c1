"""`manager_tiny` as lmms-eval tasks: documents generated in memory by `tiny_data`, no dataset download."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from .tiny_data import generate_documents, render


class GeneratedTask(ConfigurableTask):
    """A YAML-configured lmms-eval task whose documents come from `generate_documents(**dataset_kwargs)`."""

    def __init__(self, config: dict[str, Any] | None = None, model_name: str | None = None) -> None:
        # lmms-eval hands a Python task its whole YAML, including the `class` key that names this class.
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(config=config, model_name=model_name)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        split = self.config.test_split
        if not split:
            raise ValueError(f"task {self.config.task!r} must name its test_split")
        self.dataset = DatasetDict({split: Dataset.from_list(generate_documents(**(dataset_kwargs or {})))})
        self.dataset_no_image = self.dataset  # the documents hold no pixels


def doc_to_visual(document: dict[str, Any]) -> list[Image.Image]:
    """The document's image, drawn from its scene description."""
    return [render(document)]
