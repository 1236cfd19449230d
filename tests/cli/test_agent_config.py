"""`AgentConfig` (configs/agent.yaml) and the agent example that reads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent_finetune.cli.agent_config import AgentConfig
from agent_finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_agent_config_loads() -> None:
    config = AgentConfig.from_yaml(ROOT / "configs" / "agent.yaml")
    assert config.roles and all(role.model for role in config.roles.values())


@pytest.mark.parametrize(
    "server", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"]
)
def test_server_with_or_without_v1(server: str) -> None:
    config = AgentConfig(server=server, roles={"a": {"adapter": "bot", "version": "v0002"}})
    assert config.base_url == "http://h:8000/v1"
    assert config.roles["a"].model == "bot@v0002"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "not found"),
        ("roles: {a: {adapter: Bad/Name}}", "invalid adapter name"),
        ("roles: {a: {adapter: bot, version: v2}}", "invalid version"),
        ("roles: [", "agent.yaml"),
        ("- a list", "agent.yaml"),
    ],
)
def test_a_bad_agent_config_is_a_config_error(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "agent.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_yaml(path)


def test_a_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        AgentConfig.from_yaml(tmp_path)


def test_agent_example_without_a_server_is_one_clear_line() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "agent.py"),
            "hi",
            "--server",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot reach http://127.0.0.1:9/v1" in proc.stderr
