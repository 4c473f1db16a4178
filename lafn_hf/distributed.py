"""Distributed, resumable editing of many groups: shard the groups across ``torch.distributed`` ranks.

Rank ``r`` of ``world`` edits ``groups[r::world]`` in order on its own device. Each finished group becomes the
entry ``group-{index:06d}`` and is checkpointed at once (crash-safe ``save_bank``) into the rank's shard
``out_dir/.shards/rank-{r}-of-{world}``; groups that failed are listed in ``rank-{r}-of-{world}.failures.json``
beside it. A rerun with the same groups, config and world size skips the groups its shard already holds, so a
rank that dies loses only the group it was editing (failed groups are tried again). After a barrier, rank 0
merges every shard, entries ordered by group index, into one bank saved at ``out_dir``. Without an initialised
process group this is one process (world 1) and gives the same bank.

Run it with ``torchrun --nproc_per_node N -m lafn_hf.cli edit --groups groups.jsonl --out DIR`` (see
README, "Distributed editing"); ``out_dir`` must be on a file system every rank sees.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bank.base_model import BaseModelRef
from .bank.entries import BankEntry, EditBank
from .bank.hub import is_bank_dir
from .bank.store import load_bank, save_bank
from .config import LafnConfig, config_with_defaults
from .request import EditGroup
from .routing.keys import separate_all

if TYPE_CHECKING:
    from .editing.results import EditResult
    from .model import EditableCausalLM

logger = logging.getLogger(__name__)

SHARDS_DIR = ".shards"


def entry_id_for(index: int) -> str:
    """The bank entry id of group ``index``: ``group-000042``."""
    return f"group-{index:06d}"


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class ShardedEditOutcome:
    """What ``edit_groups_sharded`` did on this rank.

    ``bank``: on rank 0 the merged bank (saved at ``out_dir`` when it has entries); on other ranks this rank's
    shard. ``results``: the groups this rank edited now (not the resumed ones); ``resumed``: group indices
    found finished in the shard; ``failures``: (group index, error), on rank 0 those of every rank.
    """

    bank: EditBank
    rank: int
    world_size: int
    results: list[EditResult] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    merged: bool = False


def shard_dir(out_dir: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    return Path(out_dir) / SHARDS_DIR / f"rank-{rank}-of-{world_size}"


def _failures_path(out_dir: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    return Path(out_dir) / SHARDS_DIR / f"rank-{rank}-of-{world_size}.failures.json"


def _write_json_atomic(path: Path, data: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _read_failures(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        return []
    return [(int(index), str(error)) for index, error in json.loads(path.read_text("utf-8"))]


def _check_resumed(entry_metadata: dict[str, Any], group: EditGroup, config: LafnConfig, where: str) -> None:
    """A checkpointed entry must come from the same group and config; else the shard is stale."""
    same = (entry_metadata.get("prompts") == {lang: e.prompt for lang, e in group.edits.items()}
            and entry_metadata.get("targets") == {lang: e.target for lang, e in group.edits.items()}
            and isinstance(entry_metadata.get("config"), dict)
            and config_with_defaults(entry_metadata["config"]) == json.loads(json.dumps(config.to_dict())))
    if not same:
        raise ValueError(f"{where} was made from another group or config than this run's; delete it (or pass "
                         "another --out) to start over")


def _load_shard(path: Path, groups: list[EditGroup], config: LafnConfig, base: BaseModelRef) -> EditBank:
    """The shard's checkpointed entries (checked to match ``groups``, ``config`` and ``base``), or an empty bank."""
    if not is_bank_dir(path):
        return EditBank()
    bank, ref = load_bank(path, allow_common=True)  # this run's own checkpoint: its groups were checked
    ref.check_compatible(base)
    for entry in bank:
        index = int(entry.id.removeprefix("group-")) if entry.id.startswith("group-") else -1
        if not 0 <= index < len(groups):
            raise ValueError(f"{path}: entry {entry.id!r} is not one of this run's {len(groups)} groups; delete "
                             "the shard to start over")
        _check_resumed(entry.metadata, groups[index], config, f"{path} (entry {entry.id})")
    return bank


def edit_groups_sharded(model: EditableCausalLM, groups: list[EditGroup], out_dir: str | os.PathLike[str],
                        config: LafnConfig | None = None, progress: bool | None = None) -> ShardedEditOutcome:
    """Edit this rank's share of ``groups``, checkpointing each, then (rank 0) merge all shards into ``out_dir``.

    The caller initialises ``torch.distributed`` (or not: world 1) and puts ``model`` on this rank's device.
    The model's bank is replaced: by this rank's shard while editing, on rank 0 by the merged bank at the end.
    Every rank must call this with the same ``groups`` and ``config``. A group raising ``ValueError``,
    ``TypeError`` or ``RuntimeError`` (e.g. ``EditFailedError``) is recorded in ``failures``; the rest go on.
    """
    config = config or model.lafn_config
    rank, world = rank_and_world()
    shard = shard_dir(out_dir, rank, world)
    shard.parent.mkdir(parents=True, exist_ok=True)
    failures_path = _failures_path(out_dir, rank, world)
    model.set_bank(_load_shard(shard, groups, config, model.base_ref))
    outcome = ShardedEditOutcome(model.bank, rank, world)
    for index in range(rank, len(groups), world):
        entry_id = entry_id_for(index)
        if entry_id in model.bank:
            outcome.resumed.append(index)
            continue
        try:
            result = model.edit(groups[index], config, progress=progress, metadata={"group_index": index},
                                entry_id=entry_id)
        except (ValueError, TypeError, RuntimeError) as error:
            logger.warning("rank %d: edit group %d failed: %s", rank, index, error)
            outcome.failures.append((index, f"{type(error).__name__}: {error}"))
            _write_json_atomic(failures_path, outcome.failures)
            continue
        save_bank(shard, model.bank, model.base_ref)  # the checkpoint: this group is never edited again
        outcome.results.append(result)
    if not outcome.failures and failures_path.exists():
        failures_path.unlink()  # a rerun fixed the earlier failures
    if outcome.resumed:
        logger.info("rank %d: %d group(s) already in %s were skipped", rank, len(outcome.resumed), shard)
    _barrier(world)
    if rank != 0:
        return outcome
    outcome.bank = merge_shards(model, groups, out_dir, world, config)
    outcome.failures = sorted(failure for r in range(world) for failure in _read_failures(_failures_path(out_dir, r, world)))
    outcome.merged = True
    return outcome


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def merge_shards(model: EditableCausalLM, groups: list[EditGroup], out_dir: str | os.PathLike[str], world: int,
                 config: LafnConfig | None = None) -> EditBank:
    """Every rank's shard merged, entries in group order, set as ``model``'s bank and saved at ``out_dir``
    (crash-safe; not written when no group took)."""
    config = config or model.lafn_config
    entries: list[BankEntry] = []
    for rank in range(world):
        shard = shard_dir(out_dir, rank, world)
        entries.extend(_load_shard(shard, groups, config, model.base_ref))
    entries.sort(key=lambda entry: int(entry.id.removeprefix("group-")))
    merged = EditBank(entries)
    separate_all(merged, model.routing.threshold_margin)  # keys edited on other ranks never met: calibrate them
    model.set_bank(merged)
    if len(merged):
        save_bank(out_dir, merged, model.base_ref)
    return merged
