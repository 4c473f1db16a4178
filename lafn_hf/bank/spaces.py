"""Where routing keys and question scopes live: their spaces (``KeySpace``, ``ScopeSpace``) and what an entry
stores in them (``RoutingKey``, ``QuestionScope``), each checked when made (``lafn_hf.routing`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def project(hidden: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
            basis: torch.Tensor | None = None) -> torch.Tensor:
    """Unit vectors of (hidden - mean) / scale along the last dimension (float32); with a ``basis`` (k, width)
    through it first, the k coordinates padded with zeros back to the width."""
    z = (hidden.float() - mean.to(hidden.device)) / scale.to(hidden.device)
    if basis is not None:
        z = torch.nn.functional.pad(z @ basis.to(hidden.device).T, (0, mean.numel() - basis.shape[0]))
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class KeySpace:
    """Where routing keys of one layer live: hidden states h (the input of decoder layer ``layer``) are compared
    as unit vectors of (h - mean) / scale (``lafn_hf.routing``). Measured on the model's own hidden states."""

    layer: int
    mean: torch.Tensor  # (hidden_size,) float32
    scale: torch.Tensor  # (hidden_size,) float32, > 0

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"key space layer must be an int >= 0, got {self.layer!r}")
        for name in ("mean", "scale"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.dim() != 1:
                raise TypeError(f"key space {name} must be a 1-D float32 tensor, got {_describe(value)}")
        if self.mean.shape != self.scale.shape or not bool(torch.isfinite(self.mean).all()):
            raise ValueError("key space mean and scale must have one shape and finite values")
        if not bool((self.scale > 0).all()) or not bool(torch.isfinite(self.scale).all()):
            raise ValueError("key space scale must be finite and > 0")

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit vectors of (hidden - mean) / scale along the last dimension (float32)."""
        return project(hidden, self.mean, self.scale)

    def __repr__(self) -> str:
        return f"KeySpace(layer={self.layer}, size={self.mean.numel()})"

    def same_as(self, other: KeySpace) -> bool:
        return (self.layer == other.layer and self.mean.shape == other.mean.shape
                and bool(torch.allclose(self.mean, other.mean, rtol=1e-3, atol=1e-4))
                and bool(torch.allclose(self.scale, other.scale, rtol=1e-3, atol=1e-4)))


@dataclass(frozen=True)
class RoutingKey:
    """An entry's representation key: a unit vector of ``space`` (read at ``space.layer``), fired at tokens
    whose projected hidden state has a cosine above ``threshold`` with it (``lafn_hf.routing``). Entries made
    together share one ``KeySpace`` object."""

    space: KeySpace
    vector: torch.Tensor  # (hidden_size,) float32, unit norm
    threshold: float

    def __post_init__(self) -> None:
        if not isinstance(self.space, KeySpace):
            raise TypeError(f"routing key space must be a KeySpace, got {type(self.space).__name__}")
        if not isinstance(self.vector, torch.Tensor) or self.vector.dtype != torch.float32 or self.vector.dim() != 1:
            raise TypeError(f"routing key vector must be a 1-D float32 tensor, got {_describe(self.vector)}")
        if self.vector.numel() != self.space.mean.numel():
            raise ValueError(f"routing key vector has size {self.vector.numel()}, its key space {self.space.mean.numel()}")
        if not bool(torch.isfinite(self.vector).all()) or abs(float(self.vector.norm()) - 1.0) > 1e-3:
            raise ValueError(f"routing key vector must be finite with norm 1, got norm {float(self.vector.norm()):.4g}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                -1.0 <= float(self.threshold) <= 1.0):
            raise ValueError(f"routing key threshold must be a cosine in [-1, 1], got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def layer(self) -> int:
        return self.space.layer

    def __repr__(self) -> str:
        return f"RoutingKey(layer={self.layer}, size={self.vector.numel()}, threshold={self.threshold:.4f})"


@dataclass(frozen=True)
class ScopeSpace(KeySpace):
    """Where question scopes of one layer live (``lafn_hf.routing.scope``): a question's states entering decoder
    layer ``layer``, pooled over the words around a subject, are compared with ``templates``: built-in prompts
    about a stand-in subject, row ``r`` asking relation ``relations[r]``. ``project`` scales like a key space
    (``mean``, ``scale``) and then, with a ``basis`` (k, hidden_size), keeps the k discriminant directions that
    tell the built-in relations apart (the result padded with zeros to hidden_size, so vectors keep one width);
    spaces without one (banks made before) compare the scaled states whole. Measured on the model itself;
    entries made together share one object."""

    templates: torch.Tensor  # (R, hidden_size) float32 unit vectors
    relations: torch.Tensor  # (R,) int64 relation of each template row
    basis: torch.Tensor | None = None  # (k, hidden_size) float32, 1 <= k <= hidden_size

    def __post_init__(self) -> None:
        super().__post_init__()
        templates, relations, basis, size = self.templates, self.relations, self.basis, self.mean.numel()
        if not isinstance(templates, torch.Tensor) or templates.dtype != torch.float32 or templates.dim() != 2:
            raise TypeError(f"scope space templates must be a 2-D float32 tensor, got {_describe(templates)}")
        if templates.shape[1] != size or not bool(torch.isfinite(templates).all()):
            raise ValueError(f"scope space templates {tuple(templates.shape)} must be finite, of the hidden size {size}")
        if not isinstance(relations, torch.Tensor) or relations.dtype != torch.int64 or relations.shape != (
                templates.shape[0],):
            raise TypeError(f"scope space relations must be a ({templates.shape[0]},) int64 tensor, "
                            f"got {_describe(relations)}")
        if relations.numel() and int(relations.min()) < 0:
            raise ValueError("scope space relations must be >= 0")
        if basis is not None and (not isinstance(basis, torch.Tensor) or basis.dtype != torch.float32
                                  or basis.dim() != 2 or basis.shape[1] != size or not 1 <= basis.shape[0] <= size):
            raise TypeError(f"scope space basis must be a (k, {size}) float32 tensor with 1 <= k <= {size}, "
                            f"got {_describe(basis)}")
        if basis is not None and not bool(torch.isfinite(basis).all()):
            raise ValueError("scope space basis must be finite")

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unit vectors of (hidden - mean) / scale, through the basis when there is one (float32, same width)."""
        return project(hidden, self.mean, self.scale, self.basis)

    def to(self, device: torch.device) -> ScopeSpace:
        """This space with its tensors on ``device``."""
        return ScopeSpace(self.layer, self.mean.to(device), self.scale.to(device), self.templates.to(device),
                          self.relations.to(device), None if self.basis is None else self.basis.to(device))

    def same_as(self, other: KeySpace) -> bool:
        if not (isinstance(other, ScopeSpace) and super().same_as(other) and (self.basis is None) == (other.basis is None)
                and self.templates.shape == other.templates.shape and torch.equal(self.relations, other.relations)
                and bool(torch.allclose(self.templates, other.templates, rtol=1e-3, atol=1e-4))):
            return False
        return other.basis is None or self.basis is not None and self.basis.shape == other.basis.shape and bool(
            torch.allclose(self.basis, other.basis, rtol=1e-3, atol=1e-4))

    def __repr__(self) -> str:
        basis = "" if self.basis is None else f", basis={self.basis.shape[0]}"
        return f"ScopeSpace(layer={self.layer}, size={self.mean.numel()}, templates={self.templates.shape[0]}{basis})"


@dataclass(frozen=True)
class QuestionScope:
    """Which questions an entry answers (``lafn_hf.routing.scope``): a question whose pooled state (see
    ``ScopeSpace``) is closer to ``vectors`` (the entry's own prompts) or to the templates of ``relation`` (the
    built-in relation nearest to its prompts; -1: none) than to every other relation's templates, by at least
    ``margin`` (a cosine difference; negative lets nearer misses through), is in scope."""

    space: ScopeSpace
    vectors: torch.Tensor  # (P, hidden_size) float32 unit vectors
    relation: int
    margin: float

    def __post_init__(self) -> None:
        if not isinstance(self.space, ScopeSpace):
            raise TypeError(f"question scope space must be a ScopeSpace, got {type(self.space).__name__}")
        vectors = self.vectors
        if not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32 or vectors.dim() != 2 or (
                vectors.shape[1] != self.space.mean.numel() or not vectors.shape[0]):
            raise TypeError(f"question scope vectors must be a (P >= 1, {self.space.mean.numel()}) float32 tensor, "
                            f"got {_describe(vectors)}")
        norms = vectors.norm(dim=1)
        if not bool(torch.isfinite(vectors).all()) or not bool(((norms - 1).abs() <= 1e-3).all()):
            raise ValueError("question scope vectors must be finite unit vectors")
        if isinstance(self.relation, bool) or not isinstance(self.relation, int) or self.relation < -1:
            raise ValueError(f"question scope relation must be an int >= -1, got {self.relation!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not -2.0 <= self.margin <= 2.0:
            raise ValueError(f"question scope margin must be a number in [-2, 2], got {self.margin!r}")
        object.__setattr__(self, "margin", float(self.margin))

    @property
    def layer(self) -> int:
        return self.space.layer

    def __repr__(self) -> str:
        return (f"QuestionScope(layer={self.layer}, vectors={self.vectors.shape[0]}, relation={self.relation}, "
                f"margin={self.margin:+.3f})")
