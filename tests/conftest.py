"""Shared fixtures: the tiny LLaVA-OneVision is built once per session; every test gets a fresh copy."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training runs cache their validation pass (training.data.validation): in a directory of this session, not ~/.cache.
if "LLAVA_MANAGER_CACHE" not in os.environ:
    os.environ["LLAVA_MANAGER_CACHE"] = tempfile.mkdtemp(prefix="llava-manager-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LLAVA_MANAGER_CACHE"], True)

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A directory holding the tiny model and processor (HF format)."""
    from llava_integration.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    processor.tokenizer.padding_side = "left"
    return processor


@pytest.fixture
def tiny_model(tiny_dir):
    """A fresh fp32 tiny model in eval mode."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests: the tiny model is fastest on one thread, above all on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
