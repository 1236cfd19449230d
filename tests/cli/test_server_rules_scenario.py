"""Scenario: every command that talks to a server follows one URL rule and one API key rule.

`status`, `canary status`, `eval --server` and `ask` against one real HTTP server that
requires a key: the server may be named with or without /v1, and the key may come from
--api-key, $VLLM_API_KEY or $OPENAI_API_KEY (issue 20: `status --server .../v1` asked
/v1/v1/adapters; three commands read only $OPENAI_API_KEY and one only $VLLM_API_KEY).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_plugin_server import FakePluginServer, serving
from helpers import registry_with_versions

from agent_finetune.cli import main
from agent_finetune.registry import Registry

KEY = "s3cret"
Argv = Callable[[str, Registry, Path], list[str]]

COMMANDS: dict[str, Argv] = {
    "status": lambda url, reg, data: ["status", "--server", url],
    "canary status": lambda url, reg, data: [
        *("canary", "status", "bot", "--server", url, "--registry", str(reg.root)),
    ],
    "eval": lambda url, reg, data: [
        *("eval", "bot@v0002", "--data", str(data), "--server", url),
        *("--registry", str(reg.root), "--json"),
    ],
    "ask": lambda url, reg, data: ["ask", "bot", "hi", "--server", url],
}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Registry, Path]]:
    for name in ("VLLM_API_KEY", "OPENAI_API_KEY", "AGENT_FINETUNE_SERVER"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps([{"instruction": "hi?", "response": "bot says hello"}]))
    yield registry_with_versions(tmp_path, "bot", 2), data


# Where the key comes from: the flag, or variables (a key of another service in a variable
# that comes later in the rule must not win).
KEY_SOURCES: dict[str, tuple[list[str], dict[str, str]]] = {
    "--api-key": (["--api-key", KEY], {"OPENAI_API_KEY": "sk-for-another-service"}),
    "VLLM_API_KEY": ([], {"VLLM_API_KEY": KEY, "OPENAI_API_KEY": "sk-for-another-service"}),
    "OPENAI_API_KEY": ([], {"OPENAI_API_KEY": KEY}),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("suffix", "key_from"),
    [("", "--api-key"), ("/v1", "VLLM_API_KEY"), ("/v1/", "OPENAI_API_KEY")],
)
def test_every_server_command_takes_both_url_forms_and_every_key_source(
    command: str,
    suffix: str,
    key_from: str,
    setup: tuple[Registry, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry, data = setup
    flags, variables = KEY_SOURCES[key_from]
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with serving(FakePluginServer(api_key=KEY)) as fake:
        code = main([*COMMANDS[command](fake.url + suffix, registry, data), *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    assert fake.seen, "no request reached the server"
    assert all(s.authorization == f"Bearer {KEY}" for s in fake.seen)
    assert not any(s.path.startswith("/v1/v1") for s in fake.seen)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_key_is_one_line_naming_the_url_and_the_fix(
    command: str, setup: tuple[Registry, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    registry, data = setup
    with serving(FakePluginServer(api_key=KEY)) as fake:
        code = main(COMMANDS[command](fake.url, registry, data))
    out = capsys.readouterr()
    text = out.err + out.out  # status reports an unreadable server as a problem line
    assert code == 1 and "Traceback" not in text
    assert f"{fake.url}/" in text and "refused" in text
    assert "--api-key" in text and "VLLM_API_KEY" in text
