"""lafn_hf: multilingual knowledge editing with Language-Agnostic Factual Neurons (arXiv 2406.16416)."""

from .bank.entries import BankEntry, EditBank, LayerUpdate
from .config import LafnConfig
from .editing.results import EditFailedError, EditManyResult, EditResult
from .editing.subject_span import SubjectNotFoundError, SubjectSpan
from .model import EditableCausalLM
from .request import EditGroup, LanguageEdit

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
