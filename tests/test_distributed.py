"""``lafn edit --groups``: 2-process torchrun == 1 process; resumable shards (``lafn_hf.distributed``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lafn_hf import EditableCausalLM, LafnConfig
from lafn_hf.bank.store import load_bank, save_bank
from lafn_hf.distributed import edit_groups_sharded, entry_id_for, shard_dir
from lafn_hf.models import tiny_fact_group, tiny_model_path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_groups(path: Path, count: int) -> None:
    lines = [json.dumps(tiny_fact_group(i, i + 1, ("en", "zh")).to_dict(), ensure_ascii=False) for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_edit_equals_one_process(tmp_path: Path) -> None:
    _write_groups(tmp_path / "g.jsonl", 6)
    common = ["edit", "--model", "tiny-bilingual", "--groups", "g.jsonl", "--device", "cpu"]
    one = _run(["-m", "lafn_hf.cli", *common, "--out", "d1"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "lafn_hf.cli", *common, "--out", "d2"], tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "saved 6 edit(s) from 2 rank(s) to d2" in two.stdout and two.stdout.count("saved ") == 1  # rank 0 only
    bank1, _ = load_bank(tmp_path / "d1")
    bank2, _ = load_bank(tmp_path / "d2")
    assert [e.id for e in bank1] == [e.id for e in bank2] == [entry_id_for(i) for i in range(6)]
    for a, b in zip(bank1, bank2):
        assert a.subjects == b.subjects and a.layers == b.layers
        for layer in a.layers:
            assert torch.equal(a.updates[layer].neurons, b.updates[layer].neurons)
            torch.testing.assert_close(a.updates[layer].delta, b.updates[layer].delta, atol=1e-5, rtol=0)
        assert a.key is not None and b.key is not None  # routing keys, calibrated across ranks on the merge
        torch.testing.assert_close(a.key.vector, b.key.vector, atol=1e-5, rtol=0)
        assert abs(a.key.threshold - b.key.threshold) < 1e-5
    assert {p.name for p in (tmp_path / "d2" / ".shards").iterdir()} == {"rank-0-of-2", "rank-1-of-2"}


@pytest.fixture()
def tiny() -> EditableCausalLM:
    return EditableCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)


def test_a_resumed_run_edits_only_the_unfinished_groups(tmp_path: Path, tiny: EditableCausalLM,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    groups = [tiny_fact_group(i, i + 1, ("en", "zh")) for i in range(3)]
    config = LafnConfig(steps=10, min_target_probability=0.0)
    first = edit_groups_sharded(tiny, groups, tmp_path / "out", config)
    assert first.merged and [e.id for e in first.bank] == [entry_id_for(i) for i in range(3)]
    # a crash after group 0: the shard holds only its checkpoint and no merged bank was written
    shard = shard_dir(tmp_path / "out", 0, 1)
    kept = first.bank.get(entry_id_for(0))
    bank, base = load_bank(shard)
    for index in (1, 2):
        bank.remove(entry_id_for(index))
    save_bank(shard, bank, base)
    calls: list[str | None] = []
    edit = tiny.edit

    def counting_edit(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("entry_id"))
        return edit(*args, **kwargs)

    monkeypatch.setattr(tiny, "edit", counting_edit)
    second = edit_groups_sharded(tiny, groups, tmp_path / "out", config)
    assert calls == [entry_id_for(1), entry_id_for(2)] and second.resumed == [0]
    assert [e.id for e in second.bank] == [entry_id_for(i) for i in range(3)]
    resumed = second.bank.get(entry_id_for(0))
    assert all(torch.equal(resumed.updates[k].delta, kept.updates[k].delta) for k in kept.updates)
    assert [e.id for e in load_bank(tmp_path / "out")[0]] == [entry_id_for(i) for i in range(3)]
    calls.clear()  # a finished run resumes everything
    assert edit_groups_sharded(tiny, groups, tmp_path / "out", config).resumed == [0, 1, 2] and calls == []
    with pytest.raises(ValueError, match="another group or config"):  # a stale shard is refused, not mixed in
        edit_groups_sharded(tiny, groups, tmp_path / "out", LafnConfig(steps=11, min_target_probability=0.0))
    from lafn_hf.distributed import _check_resumed

    metadata = dict(resumed.metadata, config={k: v for k, v in resumed.metadata["config"].items()
                                              if k not in ("question_variants", "early_stop_on")})
    _check_resumed(metadata, groups[0], config, "an older shard")  # keys added since: their defaults, resumes


def test_failed_groups_are_recorded_and_retried(tmp_path: Path, tiny: EditableCausalLM) -> None:
    groups = [tiny_fact_group(i, i + 1, ("en", "zh")) for i in range(2)]
    outcome = edit_groups_sharded(tiny, groups, tmp_path / "out", LafnConfig(steps=1, min_target_probability=0.999))
    assert len(outcome.bank) == 0 and [index for index, _ in outcome.failures] == [0, 1]
    assert "EditFailedError" in outcome.failures[0][1] and not (tmp_path / "out" / "lafn_config.json").exists()
    failures = tmp_path / "out" / ".shards" / "rank-0-of-1.failures.json"
    assert [index for index, _ in json.loads(failures.read_text("utf-8"))] == [0, 1]
    retried = edit_groups_sharded(tiny, groups, tmp_path / "out", LafnConfig(steps=10, min_target_probability=0.0))
    assert len(retried.bank) == 2 and retried.failures == [] and not failures.exists()


def test_groups_file_is_checked_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lafn_hf.cli import main

    _write_groups(tmp_path / "g.jsonl", 1)
    with open(tmp_path / "g.jsonl", "a", encoding="utf-8") as handle:
        handle.write("\n{oops\n")  # blank lines are skipped; line 3 is broken
    assert main(["edit", "--model", "no/such-model", "--groups", str(tmp_path / "g.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "g.jsonl line 3 is not valid JSON" in capsys.readouterr().err
