"""Time the training data's validation pass on a synthetic mixture: the first start (every image opened, every record
tokenised) and a later start or resume (the cached outcome read back).

`python -m benchmarks.validation --records 100000 --images 2000 --workers 2`
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from transformers import AutoProcessor

from llava_integration.tiny import write_tiny
from training.data import get_template, read_data, validate_data
from training.model_setup import configure_processor
from training.recipe import load_recipe
from training.synthetic import write_synthetic


def mixture(directory: Path, records: int, images: int) -> Path:
    """`records` records (single-image, two-image and text-only conversations, as the synthetic set mixes them) over
    `images` distinct image files, in one mixture YAML of three data files."""
    write_synthetic(directory, seed=0, num_scenes=images)
    sources = {name: json.loads((directory / name).read_text()) for name in ("qa.json", "multi.json")}
    sources["text.json"] = [json.loads(line) for line in (directory / "text.jsonl").read_text().splitlines()]
    shares = {"qa.json": 0.6, "multi.json": 0.1, "text.json": 0.3}
    lines = ["datasets:"]
    for name, share in shares.items():
        pool, count = sources[name], int(records * share)
        rows = [{**pool[i % len(pool)], "id": f"{name}-{i}"} for i in range(count)]
        (directory / f"bench_{name}").write_text(json.dumps(rows))
        lines.append(f"  - json_path: bench_{name}\n    sampling_strategy: all")
    (directory / "bench.yaml").write_text("\n".join(lines) + "\n")
    return directory / "bench.yaml"


def main(argv: list[str] | None = None) -> None:
    """Print the time of the first and of a cached validation pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=2000, help="distinct image files the records refer to")
    parser.add_argument("--workers", type=int, default=2, help="threads opening images (dataloader_num_workers)")
    parser.add_argument("--recipe", default="stage2_manager", help="the recipe whose template and grids apply")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        data = mixture(root / "data", args.records, args.images)
        recipe = load_recipe(args.recipe)
        processor = AutoProcessor.from_pretrained(write_tiny(root / "tiny"))
        configure_processor(processor, recipe, recipe.image_aspect_ratio)
        records = read_data(data)
        settings = {
            "template": get_template(recipe.template),
            "processor": processor,
            "image_folder": root / "data",
            "image_aspect_ratio": recipe.image_aspect_ratio,
            "max_length": recipe.model_max_length,
            "num_workers": args.workers,
            "cache_dir": root / "cache",
        }
        for label in ("first start (checked, cached)", "resume (read from the cache)"):
            start = time.perf_counter()
            checked = validate_data(records, **settings)
            seconds = time.perf_counter() - start
            print(f"{label}: {len(checked.records)} records in {seconds:.1f} s")


if __name__ == "__main__":
    main()
