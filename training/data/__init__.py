"""Training data: LLaVA records and mixtures, prompt templates, the validation pass, dataset, collator, sampler."""

from .collator import IGNORE_INDEX, TrainingCollator, dummy_image
from .dataset import BAD_RECORDS, ConversationDataset
from .image_tokens import image_token_counts
from .mixture import SAMPLING_STRATEGIES, read_data, read_mixture, sample_records
from .records import DataFileError, Record, read_records
from .sampler import ModalityLengthGroupedSampler
from .templates import TEMPLATES, ChatTemplate, Encoded, PlainTemplate, chatml_assistant_mask, get_template
from .validation import BadDataError, CheckedData, Problem, check_records, validate_data

__all__ = [
    "BAD_RECORDS",
    "IGNORE_INDEX",
    "SAMPLING_STRATEGIES",
    "TEMPLATES",
    "BadDataError",
    "ChatTemplate",
    "CheckedData",
    "ConversationDataset",
    "DataFileError",
    "Encoded",
    "ModalityLengthGroupedSampler",
    "PlainTemplate",
    "Problem",
    "Record",
    "TrainingCollator",
    "chatml_assistant_mask",
    "check_records",
    "dummy_image",
    "get_template",
    "image_token_counts",
    "read_data",
    "read_mixture",
    "read_records",
    "sample_records",
    "validate_data",
]
