"""`agent_finetune.cli.app`: the parser, and the one place exceptions become exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run

from agent_finetune.cli import app, main, registry_commands
from agent_finetune.errors import (
    DataError,
    GateRefusedError,
    ServerUnavailableError,
)
from agent_finetune.registry import Registry
from agent_finetune.training.numpy_adapter import write_adapter


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["promote"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("error", "code", "prefix"),
    [
        (DataError("data.json:3: missing field 'response'"), app.EXIT_FAILED, "error: "),
        (ServerUnavailableError("cannot reach http://h/v1/adapters"), app.EXIT_FAILED, "error: "),
        (GateRefusedError("bot@v0002 not promoted"), app.EXIT_REFUSED, "refused: "),
        (KeyboardInterrupt(), app.EXIT_INTERRUPTED, "interrupted"),
    ],
)
def test_exceptions_become_exit_codes_and_one_line(
    error: BaseException,
    code: int,
    prefix: str,
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def command(args: object) -> int:
        raise error

    monkeypatch.setattr(registry_commands, "cmd_gc", command)
    assert run(capsys, "gc", "bot") == (code, "", f"{prefix}{error}".rstrip() + "\n")


def test_user_errors_exit_1_without_traceback(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "publish", "Bad/Name", str(write_adapter(tmp_path / "a")))
    assert code == 1 and err.startswith("error: invalid adapter name") and "Traceback" not in err
    code, _, err = run(capsys, "rollback", "nobody")
    assert code == 1 and "error:" in err
    env.mkdir()
    code, _, err = run(capsys, "promote", "bot", "v1")
    assert code == 1 and "invalid version" in err


def test_missing_registry_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENT_FINETUNE_REGISTRY", raising=False)
    code, _, err = run(capsys, "list")
    assert code == 1 and "--registry" in err and "AGENT_FINETUNE_REGISTRY" in err


def test_json_into_a_closed_pipe_is_quiet(env: Path, tmp_path: Path) -> None:
    reg = Registry(env)
    adapter = write_adapter(tmp_path / "a")
    for _ in range(3):
        reg.publish("bot", adapter)
    for _ in range(400):  # history --json well past a pipe buffer
        reg.rollback("bot", to="v0001")
        reg.promote("bot", "v0003")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_finetune.cli", "history", "bot", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "AGENT_FINETUNE_REGISTRY": str(env)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == app.EXIT_PIPE and err == ""
