from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lafn_hf.cli import build_parser, main
from lafn_hf.models import load_dtype

from .conftest import TINY_DIR, fact_group

REPO = Path(__file__).resolve().parents[1]


def test_demo_on_the_tiny_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--model", "tiny-bilingual", "--out", str(tmp_path / "bank")]) == 0
    out = capsys.readouterr().out
    assert "generations identical = True" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| en | ", "| zh | "))]
    assert [row[0] for row in rows] == ["| en", "| zh", "| en", "| zh"]  # edit prompts, then held-out ones
    assert [row[-1] for row in rows] == ["Notes. |", "伦夸城。 |"] * 2  # fact 1's capital, in each language
    assert all(row[2] != row[3] for row in rows)
    assert (tmp_path / "bank" / "lafn_config.json").is_file() and any((tmp_path / "bank").glob("lafn_bank*.safetensors"))


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


def test_version_and_help_on_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("lafn 0.")
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [f"{name} {action.dest}" for name, sub in [("lafn", parser), *commands.items()] for action in sub._actions
            if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert bare == []
    for name in ("demo", "edit", "eval", "neurons"):
        options = {option for action in commands[name]._actions for option in action.option_strings}
        assert {"--dtype", "--device"} <= options, name


def test_edit_validates_the_group_file_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lafn_hf.cli.banks.load_model", lambda *a, **k: pytest.fail("loaded the model for a bad file"))
    edit = '{"prompt": "Rome lies in", "subject": "Rome", "target": "Italy"}'
    cases = {
        f'[{{"en": {edit}}}, {{"en": {edit}, "en": {edit}}}]': "group 1: key 'en' is given twice",
        '{"en": {"prompt": "Rome lies in", "subject": "Rome", "target": "Italy", "paraphrases": "Rome is in"}}':
            "group 0: paraphrases must be a list of str, got str",
        '{"en": {"prompt": "Where is the city", "subject": "the", "target": "Italy"}}':
            "group 0: edits['en']: subject 'the' is refused",
        '[{"en": ': "is not valid JSON",
    }
    for text, message in cases.items():
        (tmp_path / "group.json").write_text(text, encoding="utf-8")
        code = main(["edit", "--model", "tiny-bilingual", "--group", str(tmp_path / "group.json"), "--out",
                     str(tmp_path / "bank")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (text, err)
    assert not (tmp_path / "bank").exists()


def test_edit_reports_groups_that_did_not_take(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               facts: dict[str, Any]) -> None:
    subject = facts["facts"][0]["en"]["subject"]
    invisible = {"en": {"prompt": f"The capital of {subject} is", "subject": subject, "target": "\u200b"}}
    (tmp_path / "groups.json").write_text(json.dumps([invisible, fact_group(facts, 2, 3).to_dict()]), encoding="utf-8")
    code = main(["edit", "--model", "tiny-bilingual", "--group", str(tmp_path / "groups.json"), "--out",
                 str(tmp_path / "bank")])
    out, err = capsys.readouterr()
    assert code == 1 and "group 0 failed: EditFailedError: the edit did not take" in err
    assert "saved 1 edit(s)" in out and "1 of 2 group(s) failed" in err
    (tmp_path / "one.json").write_text(json.dumps(invisible), encoding="utf-8")
    code = main(["edit", "--model", "tiny-bilingual", "--group", str(tmp_path / "one.json"), "--out",
                 str(tmp_path / "empty")])
    assert code == 1 and "no edit took; nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def test_dtype_defaults_to_float32_on_cpu_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_dtype("auto", "cpu") == torch.float32 and load_dtype("auto", "cuda:0") == "auto"
    assert load_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'int8'"):
        load_dtype("int8", "cpu")
    AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / file).write_bytes((TINY_DIR / file).read_bytes())
    for flags, dtype in (([], "float32"), (["--dtype", "bfloat16", "--device", "cpu"], "bfloat16")):
        code = main(["neurons", "--model", str(tmp_path / "bf16"), "--corpus", f"en={tmp_path / 'c.txt'}", *flags])
        assert code == 2  # the corpus file is missing: checked before the model loads
        (tmp_path / "c.txt").write_text("The capital of Marbrafi is\n", encoding="utf-8")
        assert main(["neurons", "--model", str(tmp_path / "bf16"), "--corpus", f"en={tmp_path / 'c.txt'}", *flags]) == 0
        (tmp_path / "c.txt").unlink()
        assert f"in torch.{dtype} on cpu" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   facts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    (tmp_path / "group.json").write_text(json.dumps(fact_group(facts, 0, 1).to_dict()), encoding="utf-8")
    assert main(["edit", "--model", "tiny-bilingual", "--group", str(tmp_path / "group.json"), "--out",
                 str(tmp_path / "bank")]) == 0
    capsys.readouterr()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert main(["push", str(tmp_path / "bank"), "me/bank", "--token", "hf_test"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lafn push: error: cannot reach the Hugging Face Hub"), err


def test_the_wheel_ships_every_asset() -> None:
    """setuptools ``package-data`` globs must match every file under lafn_hf/assets (the demo's JSON too)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lafn_hf"]
    package = REPO / "lafn_hf"
    assets = [p.relative_to(package).as_posix() for p in (package / "assets").rglob("*") if p.is_file()]
    assert "assets/demo_eiffel.json" in assets
    assert [a for a in assets if not any(fnmatch.fnmatch(a, g) and a.count("/") == g.count("/") for g in globs)] == []
