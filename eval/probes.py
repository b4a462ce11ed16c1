"""Linear probes of a vision tower: how well each hidden state answers each kind of question about a scene.

For every hidden state (0 = the patch embeddings, the last = what LLaVA-OneVision reads) and every kind of question,
a multinomial logistic regression is fitted on the concatenated patch tokens of training scenes and scored on
held-out scenes. Probe scenes are the tower's view without the grid (see `training.tower_pretraining.tower_pixels`), drawn from
their own seeds, disjoint from the tower's pretraining scenes and from the evaluated documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.synthetic import COARSE_KINDS, get_preset
from training.tower_pretraining import FACT_KINDS, SceneSet, kind_classes, scene_set

# The gate: the layer LLaVA reads must keep at most this share of what the best intermediate layer reads of the
# details above chance (mean over detail kinds), else the tiny world does not have the mechanism the ablation tests.
GATE_SHARE = 0.5


@dataclass(frozen=True)
class ProbeTable:
    """Held-out probe accuracy per kind of question, one per hidden state; and each kind's majority-class rate."""

    accuracy: dict[str, list[float]]
    majority: dict[str, float]
    train_scenes: int
    test_scenes: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "majority": self.majority, "train_scenes": self.train_scenes,
                "test_scenes": self.test_scenes}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> ProbeTable:
        return cls(data["accuracy"], data["majority"], data["train_scenes"], data["test_scenes"])


def hidden_states(tower: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """Every hidden state of `tower` on `pixels` (0: the patch embeddings), each flattened to (N, patches * width)."""
    tower.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            output = tower(pixel_values=pixels[start : start + batch_size], output_hidden_states=True)
            chunks.append([state.flatten(1) for state in output.hidden_states])
    return [torch.cat(layer) for layer in zip(*chunks)]


def fit_probe(
    train: torch.Tensor, train_labels: torch.Tensor, classes: int, weight_decay: float = 1e-3, iterations: int = 100
) -> torch.nn.Linear:
    """A multinomial logistic regression on standardised features (L-BFGS, L2 penalty), deterministic."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    probe = torch.nn.Linear(train.shape[1], classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    standardised = (train - mean) / std
    optimiser = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(standardised), train_labels)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():  # fold the standardisation into the probe: it then reads raw features
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe


def probe_tower(
    tower: torch.nn.Module,
    preset: str = "detail",
    kinds: Sequence[str] | None = None,
    train_scenes: int = 1200,
    test_scenes: int = 400,
    num_hidden_states: int | None = None,
) -> ProbeTable:
    """Probe the first `num_hidden_states` hidden states of `tower` (default: all) for each kind of question of
    `preset` (default: those it asks)."""
    kinds = list(kinds or [kind for kind in get_preset(preset).questions if kind in FACT_KINDS])
    image_size = tower.config.image_size
    train: SceneSet = scene_set("probe-train", train_scenes, preset, image_size)
    test: SceneSet = scene_set("probe-test", test_scenes, preset, image_size)
    train_states = hidden_states(tower, train.pixels)[:num_hidden_states]
    test_states = hidden_states(tower, test.pixels)[:num_hidden_states]
    accuracy: dict[str, list[float]] = {}
    majority: dict[str, float] = {}
    for kind in kinds:
        classes = kind_classes(kind, preset)
        train_labels, test_labels = train.labels(kind, classes), test.labels(kind, classes)
        majority[kind] = float((test_labels == torch.bincount(train_labels).argmax()).float().mean())
        accuracy[kind] = []
        for train_layer, test_layer in zip(train_states, test_states):
            probe = fit_probe(train_layer, train_labels, len(classes))
            with torch.no_grad():
                correct = (probe(test_layer).argmax(-1) == test_labels).float().mean()
            accuracy[kind].append(float(correct))
    return ProbeTable(accuracy, majority, train_scenes, test_scenes)


def probe_markdown(tables: dict[str, ProbeTable]) -> list[str]:
    """Markdown lines: one table per probed tower (`{title: table}`), a row per hidden state, a column per kind."""
    lines: list[str] = []
    for title, table in tables.items():
        kinds = list(table.accuracy)
        layers = len(next(iter(table.accuracy.values())))
        lines += [
            (
                f"**{title}** (probe accuracy %, {table.train_scenes} training / {table.test_scenes} held-out "
                "scenes; hidden state 0 = patch embeddings)"
            ),
            "",
        ]
        lines += ["| hidden state | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for layer in range(layers):
            name = f"{layer} (last, what LLaVA reads)" if layer == layers - 1 else str(layer)
            lines.append(f"| {name} | " + " | ".join(f"{100 * table.accuracy[k][layer]:.1f}" for k in kinds) + " |")
        lines.append("| majority class | " + " | ".join(f"{100 * table.majority[k]:.1f}" for k in kinds) + " |")
        lines.append("")
    return lines


@dataclass(frozen=True)
class Gate:
    """Whether the probes show the mechanism: details read well in an intermediate layer, poorly in the last."""

    passed: bool
    last: float  # the last hidden state's mean detail accuracy above chance, as a share of perfect (0..1)
    best: float  # the same for the best intermediate hidden state
    best_layer: int
    message: str


def _above_chance(accuracy: float, majority: float) -> float:
    return (accuracy - majority) / max(1e-9, 1 - majority)


def probe_gate(table: ProbeTable, share: float = GATE_SHARE) -> Gate:
    """Check that the last hidden state reads the detail kinds at most `share` as well (above chance) as the best
    intermediate one (hidden states 1 .. last-1; 0, the patch embeddings, is the pixels' linear image)."""
    details = [kind for kind in table.accuracy if kind not in COARSE_KINDS]
    if not details:
        raise ValueError(f"the probe table holds no detail kind (it has {sorted(table.accuracy)})")
    layers = len(table.accuracy[details[0]])
    if layers < 3:
        raise ValueError(f"the probe table has {layers} hidden states: the gate needs an intermediate one")

    def mean_above_chance(layer: int) -> float:
        return sum(_above_chance(table.accuracy[k][layer], table.majority[k]) for k in details) / len(details)

    best_layer = max(range(1, layers - 1), key=mean_above_chance)
    last, best = mean_above_chance(layers - 1), mean_above_chance(best_layer)
    passed = best > 0 and last <= share * best
    verdict = "passed" if passed else f"FAILED (needs at most {share:.0%} of it)"
    message = (
        f"the layer LLaVA reads (hidden state {layers - 1}) reads the details ({', '.join(details)}) at "
        f"{100 * last:.0f}% above chance, hidden state {best_layer} at {100 * best:.0f}%: {verdict}"
    )
    return Gate(passed, last, best, best_layer, message)
