"""LLaVA-format conversation records read from json / jsonl files, each kept with where it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
# LLaVA data says human / gpt; some sets say user / assistant. Templates see "user", "assistant", "system".
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataFileError(ValueError):
    """A data file that cannot be read as LLaVA records."""


@dataclass(frozen=True)
class Record:
    """One training sample: its turns, its image paths, and its origin (file and position) for error messages."""

    id: str
    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]  # (role, text); role is whatever the file says, checked by validation
    source: str
    index: int

    @property
    def where(self) -> str:
        return f"record {self.id!r} (#{self.index} in {self.source})"

    @property
    def num_placeholders(self) -> int:
        return sum(text.count(IMAGE_PLACEHOLDER) for _, text in self.turns)


def _record(raw: Any, source: str, index: int) -> Record:
    if not isinstance(raw, dict):
        return Record(id=f"#{index}", images=(), turns=(), source=source, index=index)
    image = raw.get("image")
    images = () if image in (None, "", []) else (image,) if isinstance(image, str) else tuple(image)
    turns = tuple(
        (str(turn.get("from", "")), turn.get("value")) if isinstance(turn, dict) else ("", turn)
        for turn in (raw.get("conversations") or [])
    )
    return Record(id=str(raw.get("id", f"#{index}")), images=images, turns=turns, source=source, index=index)


def read_records(path: str | Path) -> list[Record]:
    """All records of a LLaVA `.json` (a list) or `.jsonl` (one object a line) file; structure is checked later."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".jsonl":
        raws = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raws.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFileError(f"{path}, line {line_number}: not valid JSON: {error}") from error
    else:
        try:
            raws = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(raws, list):
            raise DataFileError(f"{path} must hold a JSON list of records, got {type(raws).__name__}")
    return [_record(raw, str(path), index) for index, raw in enumerate(raws)]
