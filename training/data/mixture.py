"""Data mixtures: a YAML list of `json_path` + `sampling_strategy`, as LLaVA-OneVision's training uses.

```yaml
datasets:
  - json_path: captions.json        # relative to this YAML file; `~` is expanded
    sampling_strategy: all          # all | first:N% | end:N% | random:N% | first:N | end:N | random:N | N
```
A count without `%` is absolute (a bare `N` means `first:N`); percentages round up, as the reference does.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from .records import DataFileError, Record, read_records

_STRATEGY = re.compile(r"(?:(?P<how>[a-z]+):)?(?P<amount>\d+(?:\.\d+)?)(?P<percent>%?)")


def _first(records: list[Record], count: int, seed: int) -> list[Record]:
    return records[:count]


def _end(records: list[Record], count: int, seed: int) -> list[Record]:
    return records[len(records) - count :]


def _random(records: list[Record], count: int, seed: int) -> list[Record]:
    keep = sorted(random.Random(seed).sample(range(len(records)), count))
    return [records[index] for index in keep]


SAMPLING_STRATEGIES: dict[str, Callable[[list[Record], int, int], list[Record]]] = {
    "first": _first,
    "end": _end,
    "random": _random,
}


def sample_records(records: list[Record], strategy: str, seed: int = 0) -> list[Record]:
    """The records a `sampling_strategy` string keeps (see the module docstring)."""
    strategy = str(strategy).strip()
    if strategy == "all":
        return list(records)
    match = _STRATEGY.fullmatch(strategy)
    how = (match.group("how") or "first") if match else None
    if match is None or how not in SAMPLING_STRATEGIES:
        raise ValueError(
            f"sampling_strategy {strategy!r}: expected 'all', or {sorted(SAMPLING_STRATEGIES)} followed by ':N%' or "
            "':N' (e.g. 'first:10%', 'random:1000'), or a bare count"
        )
    amount = float(match.group("amount"))
    if match.group("percent"):
        if amount > 100:
            raise ValueError(f"sampling_strategy {strategy!r}: a percentage must be at most 100")
        count = math.ceil(amount * len(records) / 100)
    else:
        if amount != int(amount):
            raise ValueError(f"sampling_strategy {strategy!r}: an absolute count must be a whole number")
        count = min(int(amount), len(records))
    return SAMPLING_STRATEGIES[how](records, count, seed)


def read_mixture(path: str | Path, seed: int = 0) -> list[Record]:
    """The records a mixture YAML selects, in the order of its entries."""
    path = Path(path).expanduser()
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataFileError(f"mixture {path} is not valid YAML: {error}") from error
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataFileError(f"mixture {path} must hold a non-empty list under 'datasets', got {spec!r}")
    records: list[Record] = []
    for number, entry in enumerate(entries):
        where = f"mixture {path}, datasets[{number}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise DataFileError(f"{where}: expected a mapping with a 'json_path' string, got {entry!r}")
        unknown = sorted(set(entry) - {"json_path", "sampling_strategy"})
        if unknown:
            raise DataFileError(f"{where}: unknown keys {unknown}, expected json_path and sampling_strategy")
        json_path = Path(entry["json_path"]).expanduser()
        if not json_path.is_absolute():
            json_path = path.parent / json_path
        try:
            records += sample_records(read_records(json_path), entry.get("sampling_strategy", "all"), seed + number)
        except ValueError as error:
            raise DataFileError(f"{where}: {error}") from error
    return records


def read_data(paths: str | Path | Sequence[str | Path], seed: int = 0) -> list[Record]:
    """Records from a json / jsonl file, a mixture YAML, or several of these (a list or a comma-separated string)."""
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    records: list[Record] = []
    for path in paths:
        path = Path(str(path).strip()).expanduser()
        records += read_mixture(path, seed) if path.suffix in (".yaml", ".yml") else read_records(path)
    return records
