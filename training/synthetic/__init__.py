"""The embedded default dataset: seeded synthetic scenes with captions, questions and answers, in LLaVA format."""

from .scenes import (
    COLOURS,
    DEFAULT_SIZES,
    LETTERS,
    NUMBER_WORDS,
    POSITIONS,
    PRESETS,
    SHAPES,
    SceneFacts,
    ScenePreset,
    generate_scene,
    get_preset,
    scene_questions,
)
from .writer import write_synthetic

__all__ = [
    "COLOURS",
    "DEFAULT_SIZES",
    "LETTERS",
    "NUMBER_WORDS",
    "POSITIONS",
    "PRESETS",
    "SHAPES",
    "SceneFacts",
    "ScenePreset",
    "generate_scene",
    "get_preset",
    "scene_questions",
    "write_synthetic",
]
