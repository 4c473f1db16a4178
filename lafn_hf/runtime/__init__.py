"""Applying a bank at inference: the hooks that add each entry's dV where routing says it fires.

``inject`` (``BankInjector``: the model pre-hook that reads each row and plans, the ``down_proj`` pre-hooks that
add the plan; ``CompiledBank``: the bank on a device with its matcher and key indices) and ``packed`` (forwards
that pack several requests' tokens into one row, as continuous-batching engines do).
"""

from .inject import BankInjector, CompiledBank, bank_disabled, entries_selected
from .packed import PackedSequence, RequestReaders, packed_batch

__all__ = [
    "BankInjector", "CompiledBank", "PackedSequence", "RequestReaders", "bank_disabled", "entries_selected",
    "packed_batch",
]
