"""The embedded default dataset: seeded synthetic scenes with captions, questions and answers, in LLaVA format."""

from .scenes import COLOURS, LETTERS, NUMBER_WORDS, POSITIONS, SHAPES, SceneFacts, generate_scene, scene_questions
from .writer import DEFAULT_SIZES, write_synthetic

__all__ = [
    "COLOURS",
    "DEFAULT_SIZES",
    "LETTERS",
    "NUMBER_WORDS",
    "POSITIONS",
    "SHAPES",
    "SceneFacts",
    "generate_scene",
    "scene_questions",
    "write_synthetic",
]
