"""How the CLI tests run a command: in this process (``run``) or as a user's shell does
(``cli``: the console entry point in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent_finetune.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``agent-finetune ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess: what a user's shell sees."""
    return subprocess.run(
        [sys.executable, "-m", "agent_finetune.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
