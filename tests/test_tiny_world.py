"""The tiny world of the demo: detail scenes (the same coarse scene with other details), the detail questions, the
tower's pretraining (only its top blocks learn, and the layer LLaVA reads becomes invariant to the details), the
linear probes and their gate, and the intervals per kind over paired seeds."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import SiglipVisionModel

from eval.intervals import delta_interval
from eval.probes import ProbeTable, fit_probe, probe_gate, probe_tower
from eval.tiny_data import answer_vocabularies, generate_documents, shipped_documents
from llava_integration.tiny import siglip_config
from training.synthetic import COARSE_KINDS, COLOURS, generate_scene, get_preset, kinded_questions
from training.tower_pretraining import FEATURE_LAYER, PretrainSettings, pretrain_tower, scene_set


def test_detail_scenes_redraw_the_same_coarse_scene_with_other_details():
    detail = get_preset("detail")
    seen = set()
    for index in range(40):
        one, facts_one = generate_scene(f"s:{index}", 64, 64, "detail", detail_rng=f"d:{index}:0")
        two, facts_two = generate_scene(f"s:{index}", 64, 64, "detail", detail_rng=f"d:{index}:1")
        # the large shape is the same (its pixel at the centre too, with its shade and noise) ...
        assert (facts_one.shape, facts_one.colour) == (facts_two.shape, facts_two.colour)
        assert one.getpixel((32, 32)) == two.getpixel((32, 32))
        assert facts_one.marker_colour in detail.marker_colours and facts_one.letter in "ABCDE"
        # ... and only the details differ: the images differ only near the edges, where the details sit
        difference = np.abs(np.asarray(one, dtype=int) - np.asarray(two, dtype=int)).sum(axis=-1)
        assert difference[22:42, 22:42].sum() == 0
        seen.add((facts_one.marker_colour, facts_one.marker_position, facts_one.letter))
        # the marker is drawn in its colour (within the noise) near its edge
        image = np.asarray(one, dtype=int)
        target = np.array(COLOURS[facts_one.marker_colour])
        near = np.abs(image - target).sum(axis=-1) < 90
        rows, cols = np.nonzero(near)
        edge = {"left": cols < 16, "right": cols > 47, "top": rows < 16, "bottom": rows > 47}[facts_one.marker_position]
        assert edge.sum() >= 4, (index, facts_one)
    assert len(seen) > 20  # the details vary (colour, place, letter) across scenes


def test_detail_questions_are_asked_with_their_kind_and_answer_words():
    _, facts = generate_scene("q", 64, 64, "detail", detail_rng="q:detail")
    asked = {kind: (question, answer) for kind, question, answer in kinded_questions(facts, random.Random(0))}
    assert set(asked) == {"colour", "shape", "marker_colour", "marker_position", "letter"}
    assert asked["marker_colour"] == ("What colour is the small dot? Answer with a single word.", facts.marker_colour)
    assert asked["marker_position"][1] == facts.marker_position and asked["letter"][1] == facts.letter
    documents = generate_documents(200, seed=0, preset="detail")
    vocabularies = answer_vocabularies("detail")
    kinds = {document["kind"] for document in documents}
    assert kinds == set(vocabularies) and kinds - set(COARSE_KINDS) == {"marker_colour", "marker_position", "letter"}
    for document in documents:
        assert document["answer"] in vocabularies[document["kind"]] and document["answer"] in document["choices"]
        assert set(document["choices"]) <= set(vocabularies[document["kind"]])  # "blue" of a marker, not of a shape


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    tower = SiglipVisionModel(siglip_config())
    start = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    settings = PretrainSettings(steps=60, batch_size=32, num_scenes=64, views=2, learning_rate=4e-3)
    metrics = pretrain_tower(tower, settings, seed=0)
    return tower, start, metrics


def _view_gap(tower, layer: int) -> float:
    """Mean per-feature gap between two detail views of the same scenes, over the feature's spread (computed here)."""
    pairs = scene_set("gap", 48, "detail", tower.config.image_size, views=2)
    with torch.no_grad():
        states = tower(pixel_values=pairs.pixels, output_hidden_states=True).hidden_states[layer]
    one, two = states[0::2], states[1::2]
    return float(((one - two).abs() / states.std(dim=0).clamp_min(1e-6)).mean())


def test_tower_pretraining_trains_only_the_top_blocks_and_makes_the_read_layer_invariant(pretrained):
    tower, start, metrics = pretrained
    blocks = len(tower.encoder.layers)  # 7: stage 0 drops the last; LLaVA reads hidden state 6
    changed = {
        name.split(".")[2] for name, tensor in tower.state_dict().items() if not torch.equal(tensor, start[name])
    }
    assert changed == {str(blocks - 3), str(blocks - 2)}  # the two blocks below the feature layer, nothing else
    torch.manual_seed(0)
    random_tower = SiglipVisionModel(siglip_config()).eval()
    # Invariance where LLaVA reads, not below: the gap between two views of a scene shrank only at the read layer.
    assert _view_gap(tower, FEATURE_LAYER) < 0.5 * _view_gap(random_tower, FEATURE_LAYER)
    assert _view_gap(tower, 4) == pytest.approx(_view_gap(random_tower, 4))
    assert set(metrics) >= {"final_invariance", "held_out_colour_accuracy", "held_out_shape_accuracy"}
    # Seeded: the same seed gives the same tower.
    torch.manual_seed(0)
    again = SiglipVisionModel(siglip_config())
    pretrain_tower(again, PretrainSettings(steps=60, batch_size=32, num_scenes=64, views=2, learning_rate=4e-3), 0)
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), again.state_dict().values()))


def test_pretraining_refuses_what_it_cannot_do():
    tower = SiglipVisionModel(siglip_config())
    with pytest.raises(ValueError, match="preset 'easy' draws no details"):
        pretrain_tower(tower, PretrainSettings(preset="easy"))
    with pytest.raises(ValueError, match="trained_blocks 9: expected 1..6"):
        pretrain_tower(tower, PretrainSettings(steps=1, num_scenes=2, trained_blocks=9))
    with pytest.raises(ValueError, match="views must be at least 2"):
        PretrainSettings(views=1)


class KnownStates(torch.nn.Module):
    """A stand-in tower whose hidden states are known: 0 and 2 the pixels themselves, 1 the pixels' mean colour only
    (the large shape's colour survives, a 2-px marker does not), as SigLIP's outputs are shaped."""

    config = siglip_config()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True):
        pixels = pixel_values.flatten(2).transpose(1, 2)  # (N, pixels, 3)
        mean = pixels.mean(dim=1, keepdim=True).expand_as(pixels)
        return type("Output", (), {"hidden_states": (pixels, mean.contiguous(), pixels)})


def test_probes_read_what_a_layer_holds_and_the_gate_compares_the_last_with_the_best():
    table = probe_tower(KnownStates(), "detail", ["marker_colour", "colour"], train_scenes=300, test_scenes=120)
    chance = table.majority["marker_colour"]
    assert table.accuracy["marker_colour"][0] > 0.9 and table.accuracy["marker_colour"][2] > 0.9
    assert table.accuracy["marker_colour"][1] < chance + 0.2  # the mean colour barely tells a small marker's
    assert table.accuracy["colour"][1] > 0.6  # but still the large shape's
    # The gate, on hand-made tables: last layer at chance and an intermediate one perfect passes; the reverse fails.
    majority = {"colour": 0.2, "marker_colour": 0.25, "letter": 0.2}
    good = ProbeTable({"colour": [1, 1, 1], "marker_colour": [1, 1, 0.25], "letter": [1, 0.9, 0.2]}, majority, 1, 1)
    gate = probe_gate(good)
    assert gate.passed and gate.best_layer == 1 and gate.last == pytest.approx(0) and gate.best > 0.9
    flat = ProbeTable({"colour": [1, 1, 1], "marker_colour": [1, 0.9, 0.9], "letter": [1, 0.8, 0.8]}, majority, 1, 1)
    assert not probe_gate(flat).passed and "FAILED" in probe_gate(flat).message
    with pytest.raises(ValueError, match="no detail kind"):
        probe_gate(ProbeTable({"colour": [1, 1, 1]}, {"colour": 0.2}, 1, 1))


def test_fit_probe_separates_a_linear_rule():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator)
    labels = (features[:, 2] > 0).long()
    probe = fit_probe(features, labels, 2)
    assert (probe(features).argmax(-1) == labels).float().mean() > 0.97


def test_intervals_pair_seeds_and_restrict_to_a_kind():
    rng = np.random.default_rng(4)
    documents = 300
    # Two seeds that move both variants together (a shared tower), and a constant gain of the manager.
    runs = {name: [] for name in ("baseline", "manager")}
    for shift in (0.3, 0.7):
        base = rng.random(documents) < shift
        runs["baseline"].append({doc: float(v) for doc, v in enumerate(base)})
        runs["manager"].append({doc: float(v or doc % 5 == 0) for doc, v in enumerate(base)})
    paired = delta_interval(runs["baseline"], runs["manager"], paired_runs=True)
    unpaired = delta_interval(runs["baseline"], runs["manager"])
    assert paired[1] - paired[0] < 0.5 * (unpaired[1] - unpaired[0])  # the seeds' shift cancels only when paired
    assert paired[0] > 0
    # One kind of question: the interval over those documents only, as if the others were never scored.
    kind = [doc for doc in range(documents) if doc % 3 == 0]
    subset = delta_interval(runs["baseline"], runs["manager"], paired_runs=True, documents=kind)
    filtered = {name: [{doc: run[doc] for doc in kind} for run in values] for name, values in runs.items()}
    assert subset == delta_interval(filtered["baseline"], filtered["manager"], paired_runs=True)
    with pytest.raises(ValueError, match="paired runs: 2 runs without and 1 with"):
        delta_interval(runs["baseline"], runs["manager"][:1], paired_runs=True)


@pytest.mark.parametrize("task", ["manager_tiny", "manager_tiny_detail"])
def test_the_report_per_kind_states_the_hypothesis_only_where_detail_questions_are_asked(tmp_path, task):
    from eval.question_types import SeedRun, write_question_report

    documents = shipped_documents(20, task)
    kinds = {document["question_id"]: document["kind"] for document in documents}
    runs = []
    for seed in (0, 1):
        evaluations = {}
        for variant in ("baseline", "manager"):
            directory = tmp_path / f"seed_{seed}" / variant
            directory.mkdir(parents=True)
            right = [float((doc + seed + (variant == "manager")) % 2) for doc in kinds]  # every other document
            lines = [json.dumps({"doc_id": doc, "exact_match": value}) for doc, value in zip(kinds, right)]
            (directory / f"20260101_000000_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
            evaluations[variant] = directory
        runs.append(SeedRun(seed, evaluations, None))
    text = write_question_report(runs, [task], {task: kinds}, tmp_path / "report").read_text()
    detailed = task == "manager_tiny_detail"
    assert ("**Hypothesis**" in text) == detailed and ("against the intervals" in text) == detailed
    assert ("coarse questions only" in text) != detailed
    groups = {line.split(" | ")[1] for line in text.splitlines() if line.startswith(f"| {task} (exact_match)")}
    assert groups == set(kinds.values()) | {"all"} | ({"coarse (all)", "detail (all)"} if detailed else set())
    row = next(line for line in text.splitlines() if line.startswith(f"| {task} (exact_match) | all |"))
    assert "| 20 | 50.0 | 50.0 |" in row  # each variant right on every other document, in both seeds
