"""The tiny tower's pretraining: a SigLIP made to keep the coarse scene and discard its details in the layer LLaVA reads.

A real encoder's last layer is specialised for its pretraining objective, and an objective that is invariant to a
factor (SimCLR's augmentations, CLIP's captions that name what is large in the picture) discards that factor in the
last layers while intermediate layers keep it; that is what the manager lets the LLM read. A random tiny tower has no
such specialisation, so stage 0 of the tiny world gives it one. On scenes of the `detail` preset, two views of the same
coarse scene (the same large shape, colour and place) with independently drawn details (marker colour, place, size
and rendering; letter, corner, size and ink) are a positive pair. The objective, on every patch token of the hidden
state LLaVA-OneVision reads (`FEATURE_LAYER`: the second to last; stage 0 drops the last block), is

    loss = CE(colour) + CE(shape)                     the coarse classification, from the tokens' mean
         + invariance * mean |h(view 1) - h(view 2)| / std(h)   per feature of every token, scale-free
         + contrastive * InfoNCE(view 1, view 2)       SimCLR over the batch: keep what tells scenes apart
         + (mean ||h|| / mean ||h at the start|| - 1)^2   the features keep their scale

so that layer keeps the large shape and becomes blind to the details, which nothing else asks it to keep. Only the
top `trained_blocks` blocks below that layer learn: the blocks below keep their generic (here random) weights, which
keep everything a linear probe needs, as a real encoder's lower layers are generic and its last ones specialised.
Whether the layer LLaVA reads lost the details, and whether the layers the manager reads kept them, is measured by
`eval.probes` (and gated there), not assumed. The settings were tuned on those probes alone, before any ablation.

The tower sees what the LLaVA-OneVision processor gives it without the grid: the whole image resized to its square
input, scaled to [-1, 1]. Single thread, seeded: the same seed gives the same tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from .synthetic import COARSE_KINDS, SceneFacts, generate_scene, get_preset

# The hidden state the objective reads: the one the assembled LLaVA-OneVision reads (stage 0 drops the last block).
FEATURE_LAYER = -2
# The kinds of question the pretraining and the probes know: each names the SceneFacts field it asks about.
FACT_KINDS = ("colour", "shape", "letter", "marker_colour", "marker_position")


@dataclass(frozen=True)
class SceneSet:
    """Scenes as the tower sees them: pixel values (N, 3, S, S) and each scene's facts."""

    pixels: torch.Tensor
    facts: list[SceneFacts]

    def labels(self, kind: str, classes: Sequence[str]) -> torch.Tensor:
        """The index in `classes` of each scene's answer to a question of `kind`."""
        if kind not in FACT_KINDS:
            raise ValueError(f"question kind {kind!r}: expected one of {sorted(FACT_KINDS)}")
        index = {name: position for position, name in enumerate(classes)}
        values = [getattr(facts, kind) for facts in self.facts]
        unknown = sorted({str(value) for value in values} - set(index))
        if unknown:
            raise ValueError(f"{kind} answers {unknown} are not among the classes {list(classes)}")
        return torch.tensor([index[value] for value in values])


def tower_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """The (3, S, S) input the tower gets for `image` without the grid (resized whole, scaled to [-1, 1])."""
    square = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def scene_set(prefix: str, count: int, preset: str, image_size: int, views: int = 1) -> SceneSet:
    """`count` coarse scenes of `preset` from string seeds `prefix:<index>`, each drawn `views` times with other
    details (scene i's views are rows i * views .. i * views + views - 1)."""
    if count < 1 or views < 1:
        raise ValueError(f"scene count and views must be positive, got {count} and {views}")
    sizes = get_preset(preset).sizes
    pixels, facts = [], []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        for view in range(views):
            image, scene = generate_scene(
                f"{prefix}:{index}", width, height, preset, detail_rng=f"{prefix}:{index}:detail:{view}"
            )
            pixels.append(tower_pixels(image, image_size))
            facts.append(scene)
    return SceneSet(torch.stack(pixels), facts)


def kind_classes(kind: str, preset: str) -> tuple[str, ...]:
    """The answers a question of `kind` can have on scenes of `preset`."""
    from eval.tiny_data import answer_vocabularies

    vocabularies = answer_vocabularies(preset)
    if kind not in vocabularies:
        raise ValueError(f"preset {preset!r} asks no {kind!r} questions: it asks {sorted(vocabularies)}")
    return vocabularies[kind]


@dataclass(frozen=True)
class PretrainSettings:
    """How long, how hard and on what the tower is pretrained."""

    steps: int = 400
    batch_size: int = 64  # coarse scenes per step, two views each
    learning_rate: float = 4e-3
    num_scenes: int = 1000  # coarse scenes
    views: int = 3  # detail draws per coarse scene
    invariance: float = 32.0  # the invariance term's weight against the classification's
    contrastive: float = 1.0  # the InfoNCE term's weight (0: none)
    trained_blocks: int = 2  # the top blocks below the feature layer learn; those below keep their generic init
    temperature: float = 0.1
    preset: str = "detail"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"tower pretraining {name} must be positive, got {getattr(self, name)}")
        if self.views < 2:
            raise ValueError(f"tower pretraining views must be at least 2 (a positive pair), got {self.views}")
        if self.invariance < 0:
            raise ValueError(f"tower pretraining invariance weight must be >= 0, got {self.invariance}")

    def to_dict(self) -> dict:
        return asdict(self)


def coarse_kinds(preset: str) -> tuple[str, ...]:
    """The kinds of question of `preset` about its large shape (the pretraining's classification labels)."""
    kinds = tuple(kind for kind in get_preset(preset).questions if kind in COARSE_KINDS and kind in FACT_KINDS)
    if not kinds:
        raise ValueError(f"preset {preset!r} asks no coarse question the tower could be pretrained on")
    return kinds


def pretrain_tower(tower: torch.nn.Module, settings: PretrainSettings, seed: int = 0) -> dict[str, float]:
    """Train `tower` (a `SiglipVisionModel`) in place with the coarse + invariance objective; return the final
    training losses and the coarse accuracy on held-out scenes."""
    if not get_preset(settings.preset).marker_colours:
        raise ValueError(f"preset {settings.preset!r} draws no details: the invariance objective needs a detail preset")
    image_size = tower.config.image_size
    scenes = scene_set(f"tower:{seed}", settings.num_scenes, settings.preset, image_size, settings.views)
    held_out = scene_set(f"tower-held-out:{seed}", 256, settings.preset, image_size)
    kinds = coarse_kinds(settings.preset)
    classes = {kind: kind_classes(kind, settings.preset) for kind in kinds}
    labels = {kind: scenes.labels(kind, classes[kind]) for kind in kinds}
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded heads, without moving the caller's global generator
        torch.manual_seed(seed)
        heads = torch.nn.ModuleDict(
            {kind: torch.nn.Linear(tower.config.hidden_size, len(classes[kind])) for kind in kinds}
        )
    blocks = tower.encoder.layers
    feature_blocks = len(blocks) + 1 + FEATURE_LAYER  # the blocks below the hidden state LLaVA reads
    if not 1 <= settings.trained_blocks <= feature_blocks:
        raise ValueError(
            f"trained_blocks {settings.trained_blocks}: expected 1..{feature_blocks} (the blocks below the feature layer)"
        )
    first_trained = feature_blocks - settings.trained_blocks
    trained = blocks[first_trained:feature_blocks]
    optimiser = torch.optim.AdamW([*trained.parameters(), *heads.parameters()], lr=settings.learning_rate)
    # The blocks below stay as they are: their output for every scene is computed once.
    with torch.no_grad():
        tower.eval()
        inputs = torch.cat(
            [
                tower(pixel_values=chunk, output_hidden_states=True).hidden_states[first_trained]
                for chunk in scenes.pixels.split(512)
            ]
        )

    def features(pixels: torch.Tensor) -> torch.Tensor:
        return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[FEATURE_LAYER]

    with torch.no_grad():
        reference = features(scenes.pixels[:256]).norm(dim=-1).mean()
    trained.train()
    classification = invariance = torch.tensor(0.0)
    for _ in range(settings.steps):
        chosen = torch.randint(0, settings.num_scenes, (settings.batch_size,), generator=generator)
        # Two different views of each chosen scene: the first at random, the second one of the others.
        first = torch.randint(0, settings.views, (settings.batch_size,), generator=generator)
        second = (
            first + torch.randint(1, settings.views, (settings.batch_size,), generator=generator)
        ) % settings.views
        rows = torch.cat([chosen * settings.views + first, chosen * settings.views + second])
        tokens = inputs[rows]
        for block in trained:
            tokens = block(tokens, None)  # (2B, patches, width): the hidden state LLaVA reads
        pooled = torch.nn.functional.layer_norm(tokens.mean(dim=1), tokens.shape[-1:])  # scale-free, as the rest
        classification = sum(
            torch.nn.functional.cross_entropy(head(pooled), labels[kind][rows]) for kind, head in heads.items()
        ) / len(heads)
        one, two = tokens.chunk(2)
        # Each feature's gap between the views over that feature's spread in the batch: what a standardised linear
        # probe sees (a faint trace in a feature that barely varies is as readable as a large one). Not squared, so
        # the pull towards equal tokens does not fade as they get close.
        invariance = ((one - two).abs() / tokens.std(dim=0).clamp_min(1e-6)).mean()
        # InfoNCE over the batch (SimCLR): each view's whole token map must pick out its partner among the other
        # scenes', so the layer keeps what tells scenes apart (their shape, place, shade, noise) but not the details.
        flat = torch.nn.functional.normalize(
            torch.nn.functional.layer_norm(tokens, tokens.shape[-1:]).flatten(1), dim=-1
        )
        a, b = flat.chunk(2)
        similarity = a @ b.T / settings.temperature
        targets = torch.arange(len(a))
        contrastive = (
            torch.nn.functional.cross_entropy(similarity, targets)
            + torch.nn.functional.cross_entropy(similarity.T, targets)
        ) / 2
        # Every term above is scale-free: keep the tokens' size where it was (the projector LLaVA trains on them
        # from scratch expects features of the random tower's scale, not ten times it).
        size = (tokens.norm(dim=-1).mean() / reference - 1).pow(2)
        loss = classification + settings.invariance * invariance + settings.contrastive * contrastive + size
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    tower.eval()
    with torch.no_grad():
        tokens = features(held_out.pixels)
        pooled = torch.nn.functional.layer_norm(tokens.mean(dim=1), tokens.shape[-1:])
    metrics = {
        "final_classification_loss": classification.item(),
        "final_invariance": invariance.item(),
        "feature_norm_ratio": float(tokens.norm(dim=-1).mean() / reference),
    }
    for kind, head in heads.items():
        predicted = head(pooled).argmax(dim=-1)
        metrics[f"held_out_{kind}_accuracy"] = float((predicted == held_out.labels(kind, classes[kind])).float().mean())
    return metrics
