"""Making an edit: from an ``EditGroup`` to the dV of its located neurons (paper Eq. 3-9).

In pipeline order: ``subject_span`` (where each language's prompt writes the subject), ``preflight`` (checks
before any work), ``paraphrase`` / ``self_paraphrase`` (the model's own paraphrases and word-dropped variants),
``locate`` (the language-agnostic factual neurons, Eq. 3-5), ``optimize`` (dV for one group, Eq. 6-9) and
``optimize_many`` (several groups packed in one loop); ``pipeline`` chains the steps before optimisation
(``ready_edit``) and makes the bank entry after it (``new_entry``); ``results`` holds what an edit returns,
``analysis`` the neuron statistics of the paper's section 2.2. ``EditableCausalLM.edit`` (``lafn_hf.model``) runs
the pipeline with the bank off, under its edit lock.
"""

from .locate import LocatedNeurons, locate_neurons
from .optimize import OptimizationResult, optimize_update
from .optimize_many import optimize_updates
from .results import EditFailedError, EditManyResult, EditResult
from .subject_span import SubjectNotFoundError, SubjectSpan, resolve_group

__all__ = [
    "EditFailedError", "EditManyResult", "EditResult", "LocatedNeurons", "OptimizationResult", "SubjectNotFoundError",
    "SubjectSpan", "locate_neurons", "optimize_update", "optimize_updates", "resolve_group",
]
