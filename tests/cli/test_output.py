"""`agent_finetune.cli.output`: tables for people, JSON for machines."""

from __future__ import annotations

import json

import pytest

from agent_finetune.cli.output import emit_json, print_table


def test_table_columns_align_and_none_is_blank(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([("bot", "v0002", None), ("support-bot", 3, "*")], ["NAME", "VERSION", "CUR"])
    assert capsys.readouterr().out.splitlines() == [
        "NAME         VERSION  CUR",
        "-----------  -------  ---",
        "bot          v0002",
        "support-bot  3        *",
    ]


def test_json_keeps_unicode_and_stringifies_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    emit_json({"reply": "您好", "path": Path("/r/bot")})
    out = capsys.readouterr().out
    assert "您好" in out and json.loads(out) == {"reply": "您好", "path": "/r/bot"}
