"""The paths a stage reads (model, data, image folder), checked before the model libraries are even imported."""

from __future__ import annotations

from pathlib import Path

from llava_manager.models import check_model_reference


def check_paths(model_name_or_path: str, data_path: str, image_folder: str | None) -> None:
    """Raise unless the model exists (a directory, or a cached / hub id), every data file exists, and the image
    folder is a directory."""
    check_model_reference(model_name_or_path, "--model_name_or_path ")
    for path in filter(None, (part.strip() for part in data_path.split(","))):
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(
                f"--data_path {path}: no such file (expected LLaVA .json / .jsonl or a mixture .yaml)"
            )
    if image_folder is not None and not Path(image_folder).expanduser().is_dir():
        raise FileNotFoundError(f"--image_folder {image_folder}: no such directory")
