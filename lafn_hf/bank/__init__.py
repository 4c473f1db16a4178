"""The bank: what an edit leaves behind, and how it is stored and shared.

``entries`` (``LayerUpdate``, ``BankEntry``, ``EditBank`` and the routing data an entry carries: ``RoutingKey``,
``KeySpace``, ``QuestionScope``, ``ScopeSpace``), ``checks`` (an entry against the model it is applied to),
``format`` (the bank as safetensors tensors and ``lafn_config.json`` rows, tensor by tensor), ``files`` (a bank
directory's files on disk, written crash-safely) and ``hub`` (save, load, push, and the base model a bank was
made for).
"""

from .entries import BankEntry, BankLimits, EditBank, KeySpace, LayerUpdate, QuestionScope, RoutingKey, ScopeSpace
from .hub import BaseModelRef, load_bank, push_bank, save_bank

__all__ = [
    "BankEntry", "BankLimits", "BaseModelRef", "EditBank", "KeySpace", "LayerUpdate", "QuestionScope", "RoutingKey",
    "ScopeSpace", "load_bank", "push_bank", "save_bank",
]
