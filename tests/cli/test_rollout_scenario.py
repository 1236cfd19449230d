"""The rollout commands without a server: help, canary state, refusals with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def fake_scores(candidate: float, live: float) -> Any:
    """An ``evaluate_offline`` that scores every row of the candidate (first) and the live
    version (second) with fixed log-likelihoods: the gate without a model."""
    from agent_finetune.training.evaluate import EvalResult

    def evaluate(base: str, folders: dict[str, Path], examples: Any, **_: Any) -> Any:
        values = iter([candidate, live])
        return {v: EvalResult(v, {"loglik": [next(values)] * len(examples)}) for v in list(folders)}

    return evaluate


def heldout(tmp_path: Path, n: int = 12) -> str:
    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(n)]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def test_gate_on_a_read_only_registry_is_an_error_not_a_traceback(
    reg: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Finding: the OSError of the evals append escaped `promote --if-better` as a traceback."""
    import errno
    import os

    import agent_finetune.training.gate as gate_module

    monkeypatch.setattr(gate_module, "evaluate_offline", fake_scores(-1.0, -2.0))
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("evals.jsonl"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    args = ["promote", "bot@v0002", "--if-better", "--data", heldout(tmp_path)]
    assert run(reg, *args, "--base-model", "fake") == 1
    err = capsys.readouterr().err
    assert "read-only" in err and "evals.jsonl" in err and "Traceback" not in err
    assert reg.current("bot") == "v0001"


def test_canary_commands_for_an_unknown_name_are_errors_not_tracebacks(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding: `canary abort nosuch` escaped as a raw FileNotFoundError traceback."""
    for action in ("abort", "promote", "status"):
        assert run(reg, "canary", action, "nosuch") == 1
        err = capsys.readouterr().err
        assert "no adapter named 'nosuch'" in err and "Traceback" not in err
