"""Records, mixtures and the validation pass: bad data is named (record and file) before training, and the lengths
it measures are the lengths the collator produces."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import random_image
from transformers import AutoProcessor

from training.data import (
    BAD_RECORDS,
    BadDataError,
    ConversationDataset,
    DataFileError,
    TrainingCollator,
    get_template,
    read_data,
    read_mixture,
    read_records,
    sample_records,
    validate_data,
)
from training.model_setup import configure_processor
from training.recipe import load_recipe

QA = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture
def data_dir(tmp_path):
    for index, size in enumerate([(32, 32), (40, 96), (96, 40)]):
        random_image(*size, seed=index).save(tmp_path / f"img{index}.png")
    return tmp_path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_reads_json_and_jsonl_with_single_multi_and_no_images(tmp_path):
    records = [
        {"id": "one", "image": "a.png", "conversations": QA},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": QA},
        {"id": "three", "conversations": QA[1:]},
    ]
    write_json(tmp_path / "d.json", records)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("d.json", "d.jsonl"):
        read = read_records(tmp_path / name)
        assert [r.images for r in read] == [("a.png",), ("a.png", "b.png"), ()]
        assert [r.id for r in read] == ["one", "two", "three"] and read[1].index == 1
        assert read[0].turns == (("human", QA[0]["value"]), ("gpt", "red"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(DataFileError, match=r"bad.jsonl, line 2"):
        read_records(tmp_path / "bad.jsonl")


def test_sampling_strategies_keep_the_documented_records(tmp_path):
    records = read_records(write_json(tmp_path / "d.json", [{"id": str(i), "conversations": QA} for i in range(10)]))

    def ids(selected):
        return [r.id for r in selected]

    assert ids(sample_records(records, "all")) == ids(records)
    assert ids(sample_records(records, "first:25%")) == ids(records[: math.ceil(2.5)])
    assert ids(sample_records(records, "end:30%")) == ids(records[-3:])
    assert ids(sample_records(records, "first:4")) == ids(records[:4]) == ids(sample_records(records, "4"))
    assert ids(sample_records(records, "end:2")) == ids(records[-2:])
    random_pick = sample_records(records, "random:50%", seed=1)
    assert len(random_pick) == 5 and random_pick == sample_records(records, "random:50%", seed=1)
    assert set(ids(random_pick)) <= set(ids(records))
    for bad in ("middle:10%", "first:120%", "first:x", "first:2.5"):
        with pytest.raises(ValueError, match="sampling_strategy"):
            sample_records(records, bad)


def test_mixture_yaml_reads_relative_paths_and_names_its_mistakes(tmp_path):
    write_json(tmp_path / "a.json", [{"id": f"a{i}", "conversations": QA} for i in range(4)])
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"id": f"b{i}", "conversations": QA}) + "\n" for i in range(4))
    )
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: first:50%\n  - json_path: b.jsonl\n")
    assert [r.id for r in read_mixture(mixture)] == ["a0", "a1", "b0", "b1", "b2", "b3"]
    assert [r.id for r in read_data(f"{mixture},{tmp_path / 'a.json'}")][-4:] == ["a0", "a1", "a2", "a3"]

    cases = {
        "datasets: [\n": "not valid YAML",
        "something: else\n": "non-empty list under 'datasets'",
        "datasets:\n  - sampling_strategy: all\n": r"datasets\[0\].*json_path",
        "datasets:\n  - json_path: a.json\n  - json_path: a.json\n    sampling_strategy: middle:5%\n": (
            r"datasets\[1\].*sampling_strategy"
        ),
        "datasets:\n  - json_path: missing.json\n": r"datasets\[0\].*missing.json does not exist",
        "datasets:\n  - json_path: a.json\n    sampling: all\n": r"unknown keys \['sampling'\]",
    }
    for text, message in cases.items():
        mixture.write_text(text)
        with pytest.raises(DataFileError, match=message) as error:
            read_mixture(mixture)
        assert str(mixture) in str(error.value)


def bad_records(data_dir):
    (data_dir / "corrupt.png").write_bytes((data_dir / "img0.png").read_bytes()[:60])
    return [
        {"id": "good", "image": "img0.png", "conversations": QA},
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Is red a colour?"}, {"from": "gpt", "value": "yes"}],
        },
        {"id": "missing", "image": "nowhere.png", "conversations": QA},
        {"id": "corrupt", "image": "corrupt.png", "conversations": QA},
        {"id": "empty", "image": "img0.png", "conversations": []},
        {
            "id": "placeholders",
            "image": "img0.png",
            "conversations": [{"from": "human", "value": "<image><image>\nHi"}, QA[1]],
        },
        {"id": "long", "image": "img1.png", "conversations": [QA[0], {"from": "gpt", "value": "red " * 300}]},
        {"id": "role", "conversations": [{"from": "bot", "value": "hi"}, QA[1]]},
        {"id": "gpt-image", "image": "img0.png", "conversations": [QA[0], {"from": "gpt", "value": "<image> red"}]},
    ]


EXPECTED_REASONS = {
    "missing": "image 'nowhere.png' not found",
    "corrupt": "image 'corrupt.png' at .* cannot be read",
    "empty": "has no conversations",
    "placeholders": "2 <image> placeholder\\(s\\) but 1 image",
    "long": "longer than model_max_length 256",
    "role": "role 'bot'",
    "gpt-image": "placeholder in a gpt turn",
}


def test_bad_data_stops_before_training_naming_each_record_and_file(data_dir, processor):
    path = write_json(data_dir / "train.json", bad_records(data_dir))
    with pytest.raises(BadDataError) as error:
        validate_data(
            read_records(path),
            template=get_template("chat"),
            processor=processor,
            image_folder=data_dir,
            image_aspect_ratio="square",
            max_length=256,
        )
    assert len(error.value.problems) == len(EXPECTED_REASONS)
    for problem in error.value.problems:
        record_id = problem.where.split("'")[1]
        assert str(path) in problem.where
        assert re.search(EXPECTED_REASONS[record_id], problem.reason), (record_id, problem.reason)
        assert f"record '{record_id}'" in str(error.value)


def test_bad_data_skipped_when_asked_with_a_count(data_dir, processor, caplog):
    path = write_json(data_dir / "train.json", bad_records(data_dir))
    checked = validate_data(
        read_records(path),
        template=get_template("chat"),
        processor=processor,
        image_folder=data_dir,
        image_aspect_ratio="square",
        max_length=256,
        on_bad_data="skip",
    )
    assert [r.id for r in checked.records] == ["good", "text-only"]
    assert len(checked.problems) == len(EXPECTED_REASONS)
    assert f"skipping {len(EXPECTED_REASONS)} bad record(s)" in caplog.text
    assert checked.lengths[0] > 0 > checked.lengths[1]  # text-only records carry a negative length


def test_decode_check_catches_what_verify_cannot(data_dir, processor):
    """A truncated JPEG opens and passes PIL's verify, but does not decode."""
    random_image(40, 96, seed=5).save(data_dir / "whole.jpg")
    raw = (data_dir / "whole.jpg").read_bytes()
    (data_dir / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    records = read_records(
        write_json(
            data_dir / "d.json",
            [
                {"id": "cut", "image": "truncated.jpg", "conversations": QA},
                {"id": "whole", "image": "whole.jpg", "conversations": QA},
            ],
        )
    )[:1]
    kwargs = {
        "template": get_template("chat"),
        "processor": processor,
        "image_folder": data_dir,
        "image_aspect_ratio": "square",
        "max_length": 512,
    }
    assert len(validate_data(records, image_check="verify", **kwargs).records) == 1
    with pytest.raises(BadDataError, match="record 'cut'.*truncated.jpg.*cannot be read"):
        validate_data(records, image_check="decode", **kwargs)
    # Had it slipped through, the dataset names the record and file, and stands in the next record for it (the
    # trainer then skips or stops as --on_bad_data says); with no record left that decodes, it stops.
    checked = validate_data(records, image_check="verify", **kwargs)
    dataset = ConversationDataset(checked.records, checked.lengths, get_template("chat"), processor, data_dir)
    with pytest.raises(RuntimeError, match="none of the 1 records decodes; first: .*truncated.jpg.*--image_check dec"):
        dataset[0]
    whole = read_records(data_dir / "d.json")[1]
    both = ConversationDataset(
        [*checked.records, whole], [*checked.lengths, 5], get_template("chat"), processor, data_dir
    )
    sample = both[0]
    assert sample["where"] == whole.where and [image.size for image in sample["images"]] == [(96, 40)]
    [bad] = sample[BAD_RECORDS]
    assert bad["record"] == records[0].where and re.fullmatch(
        r"image 'truncated.jpg' at \S+ cannot be decoded .*", bad["reason"]
    )
    assert BAD_RECORDS not in both[1]


@pytest.mark.parametrize("recipe", ["stage1", "stage2", "stage2_nogrid"])
def test_measured_lengths_are_the_collated_lengths(data_dir, processor, recipe):
    recipe = load_recipe(recipe)
    configure_processor(processor, recipe, recipe.image_aspect_ratio)
    records = [
        {"id": "wide", "image": "img1.png", "conversations": QA},
        {"id": "square", "image": "img0.png", "conversations": QA},
    ]
    if recipe.template == "plain":
        records.append({"id": "tall", "image": "img2.png", "conversations": QA})
    else:
        records += [
            {
                "id": "tall",
                "image": "img2.png",
                "conversations": QA + [{"from": "human", "value": "And now?"}, {"from": "gpt", "value": "blue"}],
            },
            {
                "id": "two",
                "image": ["img1.png", "img2.png"],
                "conversations": [{"from": "human", "value": "<image>\n<image>\nHow many?"}, QA[1]],
            },
            {
                "id": "text",
                "conversations": [{"from": "human", "value": "Is red a colour?"}, {"from": "gpt", "value": "yes"}],
            },
        ]
    template = get_template(recipe.template)
    checked = validate_data(
        read_records(write_json(data_dir / "d.json", records)),
        template=template,
        processor=processor,
        image_folder=data_dir,
        image_aspect_ratio=recipe.image_aspect_ratio,
        max_length=4096,
    )
    dataset = ConversationDataset(checked.records, checked.lengths, template, processor, data_dir)
    collator = TrainingCollator(processor, recipe.image_aspect_ratio, 4096, ensure_image=False)
    for index in range(len(dataset)):
        batch = collator([dataset[index]])
        assert abs(checked.lengths[index]) == int(batch["attention_mask"].sum()), checked.records[index].id
        assert (checked.lengths[index] > 0) == ("pixel_values" in batch)


def test_validation_runs_once_per_data_set_and_settings(data_dir, processor, tmp_path, monkeypatch):
    """The outcome is cached by the records' content and the settings: a second start reads it without opening one
    image; another max length, image check, template or record is checked anew."""
    from training.data import validation

    records = [{"id": "square", "image": "img0.png", "conversations": QA}, {"id": "gone", "image": "no.png"}]
    path = write_json(data_dir / "d.json", records + [{"id": "text", "conversations": QA[1:]}])
    kwargs = {
        "template": get_template("chat"),
        "processor": processor,
        "image_folder": data_dir,
        "image_aspect_ratio": "square",
        "on_bad_data": "skip",
        "cache_dir": tmp_path / "cache",
    }
    first = validate_data(read_records(path), max_length=256, **kwargs)
    assert [r.id for r in first.records] == ["square"] and len(first.problems) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 1

    checks = []
    real_check = validation.check_records
    monkeypatch.setattr(validation, "check_records", lambda *a, **k: checks.append(k) or real_check(*a, **k))
    again = validate_data(read_records(path), max_length=256, **kwargs)
    assert checks == [] and again == first  # read from the cache: the same records, lengths and problems

    validate_data(read_records(path), max_length=255, **kwargs)
    validate_data(read_records(path), max_length=256, image_check="decode", **kwargs)
    validate_data(read_records(path), max_length=256, **{**kwargs, "template": get_template("plain")})
    write_json(path, [{**records[0], "conversations": [QA[0], {"from": "gpt", "value": "blue"}]}, *records[1:]])
    validate_data(read_records(path), max_length=256, **kwargs)
    assert [k["max_length"] for k in checks] == [255, 256, 256, 256] and checks[1]["image_check"] == "decode"
    assert checks[2]["template"].name == "plain" and len(list((tmp_path / "cache").iterdir())) == 5
