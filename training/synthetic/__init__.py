"""The embedded default dataset: seeded synthetic scenes with captions, questions and answers, in LLaVA format."""

from .scenes import (
    COARSE_KINDS,
    COLOURS,
    DEFAULT_SIZES,
    LETTERS,
    MARKER_POSITIONS,
    NUMBER_WORDS,
    POSITIONS,
    PRESETS,
    SHAPES,
    SceneFacts,
    ScenePreset,
    generate_scene,
    get_preset,
    kinded_questions,
    scene_questions,
)
from .writer import write_synthetic

__all__ = [
    "COARSE_KINDS",
    "COLOURS",
    "DEFAULT_SIZES",
    "LETTERS",
    "MARKER_POSITIONS",
    "NUMBER_WORDS",
    "POSITIONS",
    "PRESETS",
    "SHAPES",
    "SceneFacts",
    "ScenePreset",
    "generate_scene",
    "get_preset",
    "kinded_questions",
    "scene_questions",
    "write_synthetic",
]
