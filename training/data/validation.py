"""The validation pass: every record is checked BEFORE training starts, so bad data stops the run (or is skipped and
counted) with a message naming the record and its file, never a shape error mid-epoch.

Checked: the conversation's structure, `<image>` placeholders against images, each image file (exists and opens;
`image_check="decode"` also decodes the pixels), and the exact token length against `model_max_length`. The lengths
are kept: the length-grouped sampler uses them.

The pass runs once per data set: rank 0 checks every record and caches the outcome under a key of the records' content
and every setting that changes it; the other ranks receive it over a process group of its own, whose timeout is long
enough for a pass over millions of records. A resumed run, or the next stage on the same data, reads the cache.
Images are identified by their paths: after changing image files in place, remove the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from manager_plugin.io import write_atomically

from .image_tokens import image_token_counts
from .records import IMAGE_PLACEHOLDER, ROLES, Record

logger = logging.getLogger(__name__)
IMAGE_CHECKS = ("verify", "decode")
# What PIL raises for missing, truncated or corrupt files (verify reports some as SyntaxError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
BAD_DATA_POLICIES = ("stop", "skip")
CACHE_VERSION = 1  # bump when what `check_records` decides changes, so that older cached outcomes are not reused
# The other ranks wait for rank 0's pass on a group of their own: the default group's timeout (30 min) is too short
# for millions of records, and a real hang is still caught, one day later.
BROADCAST_TIMEOUT = timedelta(days=1)


@contextmanager
def strict_image_decoding() -> Iterator[None]:
    """In this block PIL reports truncated image files as errors, whatever the process-wide setting.

    Some libraries turn on lenient decoding for the whole process (importing lmms-eval sets
    `ImageFile.LOAD_TRUNCATED_IMAGES = True`), which would silently pad truncated images with grey.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


class BadDataError(ValueError):
    """Records that cannot be trained on, listed with where they came from."""

    def __init__(self, problems: list[Problem], shown: int = 20) -> None:
        self.problems = problems
        lines = [str(problem) for problem in problems[:shown]]
        more = f"\n... and {len(problems) - shown} more" if len(problems) > shown else ""
        super().__init__(
            f"{len(problems)} bad record(s) found before training (pass --on_bad_data skip to skip them):\n  "
            + "\n  ".join(lines)
            + more
        )


@dataclass(frozen=True)
class Problem:
    """Why one record cannot be trained on."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class CheckedData:
    """The records kept, their exact token lengths (negative for text-only records), and the problems found."""

    records: list[Record]
    lengths: list[int]
    problems: list[Problem]


def image_path(image_folder: str | Path | None, name: str) -> Path:
    """Where a record's image lives: `name` itself when absolute, else inside `image_folder`."""
    path = Path(name).expanduser()
    return path if path.is_absolute() or image_folder is None else Path(image_folder).expanduser() / path


def structure_problem(record: Record, template: str) -> str | None:
    """What is wrong with the record's conversation and placeholders, or None."""
    if not record.turns:
        return "has no conversations"
    for number, (role, text) in enumerate(record.turns):
        if role not in ROLES:
            return f"turn {number} has role {role!r}: expected one of {sorted(ROLES)}"
        if not isinstance(text, str):
            return f"turn {number} has no text value (got {text!r})"
    roles = [ROLES[role] for role, _ in record.turns]
    if "user" not in roles or not any(ROLES[r] == "assistant" and t.strip() for r, t in record.turns):
        return f"needs a human turn and a non-empty gpt turn, has roles {roles}"
    if any(IMAGE_PLACEHOLDER in text for role, text in record.turns if ROLES[role] == "assistant"):
        return f"has an {IMAGE_PLACEHOLDER} placeholder in a gpt turn"
    placeholders, images = record.num_placeholders, len(record.images)
    if placeholders > images:
        return f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {images} image(s)"
    if 0 < placeholders < images:
        return (
            f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {images} images: cannot tell where the rest go"
        )
    if template == "plain" and roles != ["user", "assistant"]:
        return f"the plain template (stage 1) takes one human turn then one gpt turn, got roles {roles}"
    return None


def _image_sizes(record: Record, image_folder, image_check: str) -> tuple[str | None, list[tuple[int, int]]]:
    sizes = []
    for name in record.images:
        path = image_path(image_folder, name)
        if not path.is_file():
            return f"image {name!r} not found at {path}", []
        try:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
                if image_check == "decode":
                    image.load()
                else:
                    image.verify()
        except IMAGE_ERRORS as error:
            return f"image {name!r} at {path} cannot be read: {type(error).__name__}: {error}", []
    return None, sizes


def check_records(
    records: list[Record],
    *,
    template,
    processor,
    image_folder: str | Path | None,
    image_aspect_ratio: str | None,
    max_length: int,
    image_check: str = "verify",
    num_workers: int = 8,
    progress: bool = True,
) -> list[tuple[int | None, str | None]]:
    """`(signed length, None)` for each good record, `(None, reason)` for each bad one."""
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"image_check {image_check!r}: expected one of {list(IMAGE_CHECKS)}")
    results: list[tuple[int | None, str | None]] = [(None, structure_problem(r, template.name)) for r in records]

    def images_of(index: int):
        return _image_sizes(records[index], image_folder, image_check)

    pending = [i for i, (_, reason) in enumerate(results) if reason is None]
    with strict_image_decoding(), ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        checked = list(
            tqdm(pool.map(images_of, pending), total=len(pending), desc="checking images", disable=not progress)
        )
    sizes: dict[int, list[tuple[int, int]]] = {}
    for index, (reason, image_sizes) in zip(pending, checked, strict=True):
        if reason is not None:
            results[index] = (None, reason)
        else:
            sizes[index] = image_sizes

    good = sorted(sizes)
    chunk = 1024
    for start in tqdm(range(0, len(good), chunk), desc="measuring lengths", disable=not progress):
        indices = good[start : start + chunk]
        texts = [template.render(records[i], processor) for i in indices]
        token_counts = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for index, text_tokens in zip(indices, token_counts, strict=True):
            images = image_token_counts(processor, sizes[index], image_aspect_ratio)
            length = text_tokens - len(images) + sum(images)
            if length > max_length:
                reason = (
                    f"is {length} tokens long ({length - sum(images)} text + {sum(images)} image tokens), longer "
                    f"than model_max_length {max_length}"
                )
                results[index] = (None, reason)
            else:
                results[index] = (length if images else -length, None)
    return results


def default_cache_dir() -> Path:
    """Where validation outcomes are cached: `$LLAVA_MANAGER_CACHE/validation`, else `~/.cache/llava_manager/...`."""
    root = os.environ.get("LLAVA_MANAGER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "llava_manager"
    return Path(root).expanduser() / "validation"


def validation_key(records: list[Record], settings: dict, template, processor) -> str:
    """A digest of the records' content, the check's settings, the template, and what of the processor sets lengths."""
    described = {"version": CACHE_VERSION, "template": template.name, **settings}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        (backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode()
    )
    digest.update(processor.image_processor.to_json_string().encode())
    digest.update(str(getattr(processor, "vision_aspect_ratio", None)).encode())
    digest.update(str(getattr(processor, "chat_template", None) or tokenizer.chat_template).encode())
    for record in records:
        digest.update(json.dumps([record.id, record.images, record.turns, record.source, record.index]).encode())
    return digest.hexdigest()


def _checked_on_rank0(records: list[Record], settings: dict, processor, template, num_workers: int, cache_dir):
    """Rank 0's outcome of every record: read from the cache, or checked now and cached."""
    key = None if cache_dir is None else validation_key(records, settings, template, processor)
    cache = None if key is None else Path(cache_dir) / f"{key}.json"
    if cache is not None and cache.is_file():
        logger.info("validation of %d records read from %s", len(records), cache)
        return [tuple(result) for result in json.loads(cache.read_text())]
    results = check_records(records, template=template, processor=processor, num_workers=num_workers, **settings)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, lambda path: Path(path).write_text(json.dumps(results)))
    return results


def validate_data(
    records: list[Record],
    *,
    template,
    processor,
    image_folder: str | Path | None,
    image_aspect_ratio: str | None,
    max_length: int,
    on_bad_data: str = "stop",
    image_check: str = "verify",
    num_workers: int = 8,
    cache_dir: str | Path | None = None,
) -> CheckedData:
    """Check every record once (rank 0; cached in `cache_dir` if given); stop or skip bad ones as `on_bad_data` says."""
    if on_bad_data not in BAD_DATA_POLICIES:
        raise ValueError(f"on_bad_data {on_bad_data!r}: expected one of {list(BAD_DATA_POLICIES)}")
    if not records:
        raise ValueError("no training records: the data path holds none")
    settings = {
        "image_folder": None if image_folder is None else str(Path(image_folder).expanduser().resolve()),
        "image_aspect_ratio": image_aspect_ratio,
        "max_length": max_length,
        "image_check": image_check,
    }
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        group = dist.new_group(backend="gloo", timeout=BROADCAST_TIMEOUT)
        shared: list = [None]
        if dist.get_rank() == 0:
            shared[0] = _checked_on_rank0(records, settings, processor, template, num_workers, cache_dir)
        dist.broadcast_object_list(shared, src=0, group=group)
        dist.destroy_process_group(group)
        results = shared[0]
    else:
        results = _checked_on_rank0(records, settings, processor, template, num_workers, cache_dir)

    kept, lengths, problems = [], [], []
    for record, (length, reason) in zip(records, results, strict=True):
        if reason is None:
            kept.append(record)
            lengths.append(length)
        else:
            problems.append(Problem(record.where, reason))
    if problems and on_bad_data == "stop":
        raise BadDataError(problems)
    if problems:
        logger.warning(
            "skipping %d bad record(s) of %d; first: %s", len(problems), len(records), "; ".join(map(str, problems[:5]))
        )
    if not kept:
        raise BadDataError(problems)
    return CheckedData(kept, lengths, problems)
