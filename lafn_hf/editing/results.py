"""What ``EditableCausalLM.edit`` and ``edit_many`` return, and the error of an edit that did not take."""

from __future__ import annotations

from dataclasses import dataclass, field

from .subject_span import SubjectSpan


@dataclass
class EditResult:
    """What ``edit`` did: located neuron counts, loss curve, final target probabilities, time."""

    entry_id: str
    layers: tuple[int, ...]
    neuron_counts: dict[str, dict[int, int]]  # language -> layer -> |D_l^i|
    shared_counts: dict[int, int]  # layer -> |D^i| (Eq. 5)
    loss_curve: list[float]
    target_loss_curve: list[float]  # the target's own tokens' NLL, mean or worst sequence (what early stopping reads)
    target_probabilities: dict[str, float]
    steps: int
    wall_time_s: float
    subjects: dict[str, str] = field(default_factory=dict)
    spans: dict[str, SubjectSpan] = field(default_factory=dict)  # where each prompt writes its subject, and how found

    def __repr__(self) -> str:
        probabilities = {lang: float(f"{p:.3g}") for lang, p in self.target_probabilities.items()}
        return (f"EditResult(entry_id={self.entry_id!r}, subjects={self.subjects!r}, layers={self.layers!r}, "
                f"shared_neurons={self.shared_counts!r}, steps={self.steps}, p(target)={probabilities!r}, "
                f"{self.wall_time_s:.1f}s)")


class EditFailedError(ValueError):
    """The optimised dV left p(target) below ``LafnConfig.min_target_probability`` in some language; the
    edit was not stored. ``target_probabilities``: every language's final p(target | prompt)."""

    def __init__(self, message: str, target_probabilities: dict[str, float], threshold: float) -> None:
        super().__init__(message)
        self.target_probabilities = target_probabilities
        self.threshold = threshold


@dataclass
class EditManyResult:
    """``edit_many`` outcome: results of the groups that worked and errors of those that did not."""

    results: list[EditResult] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (group index, error)
