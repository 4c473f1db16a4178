from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lafn_hf.cli import main

from .conftest import fact_group


def test_demo_on_the_tiny_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--model", "tiny-bilingual", "--out", str(tmp_path / "bank")]) == 0
    out = capsys.readouterr().out
    assert "generations identical = True" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| en | ", "| zh | "))]
    assert [row[0] for row in rows] == ["| en", "| zh", "| en", "| zh"]  # edit prompts, then held-out ones
    assert [row[-1] for row in rows] == ["Notes. |", "伦夸城。 |"] * 2  # fact 1's capital, in each language
    assert all(row[2] != row[3] for row in rows)
    assert (tmp_path / "bank" / "lafn_bank.safetensors").is_file()


def test_edit_info_push_dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, facts: dict[str, Any]) -> None:
    groups = [fact_group(facts, 0, 1).to_dict(), fact_group(facts, 2, 3).to_dict()]
    (tmp_path / "groups.json").write_text(json.dumps(groups, ensure_ascii=False), encoding="utf-8")
    code = main(["edit", "--model", "tiny-bilingual", "--group", str(tmp_path / "groups.json"),
                 "--out", str(tmp_path / "bank"), "--layers", "0,1"])
    assert code == 0
    assert "saved 2 edit(s)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "bank")]) == 0
    info = capsys.readouterr().out
    assert info.count("- edit-") == 2 and facts["facts"][2]["zh"]["subject"] in info
    assert main(["push", str(tmp_path / "bank"), "me/bank", "--dry-run"]) == 0
    assert "would push 2 edit(s)" in capsys.readouterr().out


def test_bad_input_gives_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "group.json").write_text('{"en": {"prompt": "A b", "subject": "zz", "target": "c"}}')
    code = main(["edit", "--model", "tiny-bilingual", "--group", str(tmp_path / "group.json"), "--out",
                 str(tmp_path / "bank")])
    assert code == 2
    assert "subject 'zz' does not occur in prompt 'A b'" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "is not an edit bank: lafn_config.json is missing" in capsys.readouterr().err
