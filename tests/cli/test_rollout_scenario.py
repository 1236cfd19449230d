"""The rollout commands without a server: help, canary state, refusals with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import registry_with_versions

from agent_finetune.cli import app
from agent_finetune.cli.app import main
from agent_finetune.registry import Registry

COMMANDS = [
    ["eval"],
    ["promote"],
    ["train"],
    ["canary"],
    ["canary", "start"],
    ["canary", "status"],
    ["canary", "promote"],
    ["canary", "abort"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_of_every_rollout_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 300


def test_exit_code_3_is_documented() -> None:
    assert app.EXIT_REFUSED == 3
    assert "3     refused by the promotion gate" in (app.__doc__ or "")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "| 3 | refused by the promotion gate" in readme


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 2)


def run(reg: Registry, *args: str) -> int:
    return main([*args, "--registry", str(reg.root)])


def test_canary_commands_drive_the_registry(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(reg, "canary", "start", "bot@v0002", "--weight", "10", "--duration", "90s") == 0
    assert "canary of v0002 on 10%" in capsys.readouterr().out
    assert run(reg, "canary", "status", "bot", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["canary"]["guards"]["duration_s"] == 90 and status["current"] == "v0001"
    assert run(reg, "canary", "status", "bot") == 0
    assert "running" in capsys.readouterr().out
    assert run(reg, "canary", "abort", "bot", "--reason", "looked wrong") == 0
    assert reg.history("bot")[-1]["reason"] == "looked wrong"
    assert run(reg, "canary", "abort", "bot") == 1
    assert "no canary running" in capsys.readouterr().err
    assert run(reg, "canary", "start", "bot@v0002", "--weight", "50") == 0
    assert run(reg, "canary", "promote", "bot") == 0
    assert reg.current("bot") == "v0002"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["canary", "start", "bot", "--weight", "10"], "NAME@vNNNN"),
        (["canary", "start", "bot@v0002", "--weight", "150"], "--weight 150"),
        (["canary", "start", "bot@v0002", "--weight", "5", "--duration", "soon"], "duration"),
        (
            ["canary", "start", "bot@v0002", "--weight", "5", "--max-error-rate", "3"],
            "max_error_rate",
        ),
        (["promote", "bot@v0002", "--if-better"], "--data"),
        (["promote", "bot"], "which version"),
        (["eval", "bot@v0009", "--data", "x.json"], "x.json"),
    ],
)
def test_bad_input_is_a_clear_error(
    reg: Registry, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(reg, *args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
