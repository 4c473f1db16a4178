"""lafn_hf: multilingual knowledge editing with Language-Agnostic Factual Neurons (arXiv 2406.16416)."""

from .bank import BankEntry, EditBank, LayerUpdate
from .config import EditGroup, LafnConfig, LanguageEdit
from .model import EditableCausalLM
from .results import EditFailedError, EditManyResult, EditResult
from .subject_span import SubjectNotFoundError, SubjectSpan

__all__ = [
    "BankEntry",
    "EditBank",
    "EditFailedError",
    "EditGroup",
    "EditManyResult",
    "EditResult",
    "EditableCausalLM",
    "LafnConfig",
    "LanguageEdit",
    "LayerUpdate",
    "SubjectNotFoundError",
    "SubjectSpan",
]
