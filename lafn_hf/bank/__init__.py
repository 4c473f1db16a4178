"""The bank: what an edit leaves behind, and how it is stored and shared.

- ``entries``: ``LayerUpdate``, ``BankEntry``, ``EditBank`` and the routing data an entry carries
  (``RoutingKey``, ``KeySpace``, ``QuestionScope``, ``ScopeSpace``);
- ``checks``: an entry against the model it is applied to, subjects and aliases against the edit rules;
- ``format``: the bank as safetensors tensors and ``lafn_config.json`` rows, tensor by tensor;
- ``lafn_config``: the directory's header file, its names and versions, checked strictly on load;
- ``base_model``: ``BaseModelRef``, the base model a bank was made for;
- ``files``: a bank directory's files on disk, read safely and written crash-safely;
- ``store``: ``save_bank`` / ``load_bank`` (the crash-safe save protocol);
- ``hub``: download and push banks on the Hugging Face Hub.
"""

from .base_model import BaseModelRef
from .entries import BankEntry, BankLimits, EditBank, KeySpace, LayerUpdate, QuestionScope, RoutingKey, ScopeSpace
from .hub import push_bank
from .store import load_bank, save_bank

__all__ = [
    "BankEntry", "BankLimits", "BaseModelRef", "EditBank", "KeySpace", "LayerUpdate", "QuestionScope", "RoutingKey",
    "ScopeSpace", "load_bank", "push_bank", "save_bank",
]
