"""Readers of the datasets' usual formats into task records.

Two formats:
- `arrow`: the ViLT/METER/ManagerTower tables (`{root}/{name}.arrow`, one row per image with a list of texts, each
  text one sample), as written by the reference's `write_*.py` scripts;
- `json`: a JSON list (or JSON lines) of records already in the task's record form, images as paths relative to the
  file's folder (or to `image_root`).

A record is a dict: `text` and `image` (`images`, two of them, for NLVR2) plus the task's fields: VQAv2 `labels` and
`scores` (answer indices and soft scores) and `question_id`, SNLI-VE and NLVR2 `label`, retrieval `image_id`. Images
stay unread (bytes or a path) until `open_image`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

ImageRef = bytes | str


def open_image(ref: ImageRef) -> Image.Image:
    """An RGB image from encoded bytes or a file path."""
    return Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref).convert("RGB")


def _arrow_paths(root: Path, names: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for name in names:
        matches = sorted(root.glob(f"{name}.arrow"))
        if not matches:
            raise FileNotFoundError(f"no table {name}.arrow under {root}")
        paths.extend(matches)
    return paths


# How to read one sample: (table, row, index in the row's list of texts) -> record.
ArrowSample = Callable[[pa.Table, int, int], dict[str, Any]]


def _caption(table: pa.Table, row: int, index: int) -> dict[str, Any]:
    return {"image": table["image"][row].as_py(), "text": table["caption"][row][index].as_py(), "image_id": row}


def _vqa(table: pa.Table, row: int, index: int) -> dict[str, Any]:
    record = {"image": table["image"][row].as_py(), "text": table["questions"][row][index].as_py()}
    record["question_id"] = table["question_id"][row][index].as_py()
    if "answer_labels" in table.column_names:  # the test split has no answers
        record["labels"] = table["answer_labels"][row][index].as_py()
        record["scores"] = table["answer_scores"][row][index].as_py()
    return record


def _snli(table: pa.Table, row: int, index: int) -> dict[str, Any]:
    # `sentences` holds [premise, hypothesis] pairs; the image is the premise, the hypothesis is the text.
    return {
        "image": table["image"][row].as_py(),
        "text": table["sentences"][row][index][1].as_py().strip(),
        "label": table["labels"][row][index].as_py(),
    }


def _nlvr2(table: pa.Table, row: int, index: int) -> dict[str, Any]:
    return {
        "images": [table["image_0"][row].as_py(), table["image_1"][row].as_py()],
        "text": table["questions"][row][index].as_py(),
        "label": int(table["answers"][row][index].as_py() == "True"),
    }


def _plain(text: str) -> str:
    return text


def _hypothesis(pair: list[str]) -> str:
    return pair[1].strip()


# Per task: the list column whose entries are samples, the text of an entry, and how to read a whole sample.
ARROW_LAYOUTS: dict[str, tuple[str, Callable[[Any], str], ArrowSample]] = {
    "pretrain": ("caption", _plain, _caption),
    "vqav2": ("questions", _plain, _vqa),
    "snli_ve": ("sentences", _hypothesis, _snli),
    "nlvr2": ("questions", _plain, _nlvr2),
    "retrieval": ("caption", _plain, _caption),
}


class ArrowRecords:
    """The samples of ViLT-style arrow tables, read lazily: one per (row, text) pair, image ids = table rows."""

    def __init__(self, root: str | Path, names: Sequence[str], task: str) -> None:
        if task not in ARROW_LAYOUTS:
            raise ValueError(f"no arrow layout for task {task!r}: expected one of {sorted(ARROW_LAYOUTS)}")
        self.text_column, self._text, self._sample = ARROW_LAYOUTS[task]
        tables = [
            pa.ipc.RecordBatchFileReader(pa.memory_map(str(path), "r")).read_all()
            for path in _arrow_paths(Path(root), names)
        ]
        self.table = pa.concat_tables(tables, promote_options="default")
        if self.text_column not in self.table.column_names:
            raise ValueError(
                f"the {task} tables under {root} have no {self.text_column!r} column: {self.table.column_names}"
            )
        counts = np.asarray(self.table[self.text_column].combine_chunks().value_lengths().fill_null(0))
        self.rows = np.repeat(np.arange(len(counts)), counts)
        self.indices = np.arange(len(self.rows)) - np.repeat(np.cumsum(counts) - counts, counts)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._sample(self.table, int(self.rows[index]), int(self.indices[index]))

    def image_ids(self) -> np.ndarray:
        """The image id of every sample (its table row), without reading any image."""
        return self.rows

    def texts(self) -> list[str]:
        """The text of every sample, without reading any image."""
        values = self.table[self.text_column].combine_chunks().flatten().to_pylist()
        return [self._text(value) for value in values]


class JsonRecords:
    """Records from a JSON list or JSON lines file; image paths are made absolute against `image_root`."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        path = Path(path)
        text = path.read_text()
        records = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
        if not isinstance(records, list):
            raise TypeError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
        root = Path(image_root) if image_root is not None else path.parent
        for number, record in enumerate(records):
            if "text" not in record or ("image" not in record and "images" not in record):
                raise ValueError(
                    f"record {number} of {path} needs 'text' and 'image' (or 'images'), got {sorted(record)}"
                )
            if "image" in record:
                record["image"] = str(root / record["image"])
            if "images" in record:
                record["images"] = [str(root / image) for image in record["images"]]
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def image_ids(self) -> np.ndarray:
        """The `image_id` of every record."""
        return np.asarray([record["image_id"] for record in self.records])

    def texts(self) -> list[str]:
        """The `text` of every record."""
        return [record["text"] for record in self.records]


class ConcatRecords:
    """Several record sources read as one."""

    def __init__(self, sources: Sequence[ArrowRecords | JsonRecords]) -> None:
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(source) for source in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[source][index - int(self.offsets[source])]

    def image_ids(self) -> np.ndarray:
        """The image id of every sample, source after source."""
        return np.concatenate([source.image_ids() for source in self.sources])

    def texts(self) -> list[str]:
        """The text of every sample, source after source."""
        return [text for source in self.sources for text in source.texts()]


def read_records(
    data_format: str, root: str | Path, names: Sequence[str], task: str, image_root: str | Path | None = None
) -> ArrowRecords | JsonRecords | ConcatRecords:
    """The records of `names` (arrow table names, globs allowed, or JSON file names) under `root`."""
    if data_format == "arrow":
        return ArrowRecords(root, names, task)
    if data_format == "json":
        sources = [JsonRecords(Path(root) / name, image_root) for name in names]
        return sources[0] if len(sources) == 1 else ConcatRecords(sources)
    raise ValueError(f"unknown data format {data_format!r}: expected 'arrow' or 'json'")
