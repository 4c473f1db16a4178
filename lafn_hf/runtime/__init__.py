"""Applying a bank at inference: the hooks that add each entry's dV where routing says it fires.

``inject`` (``BankInjector``: the model pre-hook that reads each row and asks the routing's ``CompiledBank`` for
a plan, the ``down_proj`` pre-hooks that add it, the forward hook that keeps each row's reader on the KV cache)
and ``packed`` (forwards that pack several requests' tokens into one row, as continuous-batching engines do).
"""

from ..routing.compiled import CompiledBank
from .inject import BankInjector, bank_disabled, entries_selected
from .packed import PackedSequence, RequestReaders, packed_batch

__all__ = [
    "BankInjector", "CompiledBank", "PackedSequence", "RequestReaders", "bank_disabled", "entries_selected",
    "packed_batch",
]
