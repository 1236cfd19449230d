"""Fast tests of the CLI pieces, settings, launch helpers and the pinned-model middleware."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

import server_plugin
from agent_finetune.cli import main
from agent_finetune.cli.serve import (
    add_serve_parser,
    add_sync_parser,
    serve_command,
    sync_settings,
)
from agent_finetune.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-finetune")
    sub = p.add_subparsers(dest="command")
    add_serve_parser(sub)
    add_sync_parser(sub)
    return p


def test_serve_builds_vllm_command_and_env(tmp_path: Path) -> None:
    args = parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--registry",
            str(tmp_path),
            "--port",
            "9000",
            "--",
            "--max-lora-rank",
            "32",
            "--api-key",
            "k",
        ]
    )
    cmd, env = serve_command(args)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd.count("--max-lora-rank") == 1 and cmd[cmd.index("--max-lora-rank") + 1] == "32"
    assert {"--enable-lora", "--max-loras", "--max-cpu-loras"} <= set(cmd)
    assert cmd[cmd.index("--port") + 1] == "9000" and cmd[-2:] == ["--api-key", "k"]
    assert "agent_finetune" in env["VLLM_PLUGINS"].split(",")
    assert env["AGENT_FINETUNE_REGISTRY"] == str(tmp_path)
    assert callable(args.func)


def test_serve_dry_run_and_missing_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = parser().parse_args(["serve", "--model", "m", "--registry", str(tmp_path), "--dry-run"])
    assert args.func(args) == 0
    assert "vllm.entrypoints.openai.api_server" in capsys.readouterr().out
    monkeypatch.delenv("AGENT_FINETUNE_REGISTRY", raising=False)
    # A missing registry is exit 1 for every command, as for `list` (cli.app's exit codes).
    for argv in (["serve", "--model", "m"], ["sync", "--server", "http://x"], ["list"]):
        assert main(argv) == 1, argv
        assert "--registry" in capsys.readouterr().err


def test_serve_passes_on_only_the_settings_the_user_gave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: `serve` always exported AGENT_FINETUNE_MAX_PINNED=4 over the user's value."""
    monkeypatch.setenv("AGENT_FINETUNE_MAX_PINNED", "7")
    monkeypatch.setenv("AGENT_FINETUNE_RESYNC_S", "5")
    args = parser().parse_args(["serve", "--model", "m", "--registry", str(tmp_path)])
    cmd, env = serve_command(args)
    assert env["AGENT_FINETUNE_MAX_PINNED"] == "7" and env["AGENT_FINETUNE_RESYNC_S"] == "5"
    assert "AGENT_FINETUNE_POLLING" not in env and "AGENT_FINETUNE_PRELOAD" not in env
    assert cmd[cmd.index("--max-cpu-loras") + 1] == "11"  # 0 names + 7 pinned + 4 staged
    flags = ["--max-pinned", "2", "--resync", "0.5", "--polling", "--no-strict-base"]
    args = parser().parse_args(["serve", "--model", "m", "--registry", str(tmp_path), *flags])
    _, env = serve_command(args)
    assert env["AGENT_FINETUNE_MAX_PINNED"] == "2" and env["AGENT_FINETUNE_RESYNC_S"] == "0.5"
    assert env["AGENT_FINETUNE_POLLING"] == "1" and env["AGENT_FINETUNE_STRICT_BASE"] == "0"


def test_serve_checks_the_plugins_settings_before_it_starts_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENT_FINETUNE_MAX_LOADS", "many")
    assert main(["serve", "--model", "m", "--registry", str(tmp_path), "--dry-run"]) == 1
    assert "AGENT_FINETUNE_MAX_LOADS='many'" in capsys.readouterr().err
    monkeypatch.delenv("AGENT_FINETUNE_MAX_LOADS")
    assert main(["serve", "--model", "m", "--registry", str(tmp_path), "--preload", "x,Y"]) == 1
    assert "AGENT_FINETUNE_PRELOAD='x,Y' (or --preload)" in capsys.readouterr().err


def test_sync_keeps_the_users_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: `sync` silently replaced AGENT_FINETUNE_RESYNC_S, _POLLING and _MAX_PINNED
    with its flags' defaults."""
    monkeypatch.setenv("AGENT_FINETUNE_RESYNC_S", "5")
    monkeypatch.setenv("AGENT_FINETUNE_POLLING", "1")
    monkeypatch.setenv("AGENT_FINETUNE_MAX_PINNED", "7")
    monkeypatch.setenv("AGENT_FINETUNE_STRICT_BASE", "0")
    argv = ["sync", "--server", "http://x", "--registry", str(tmp_path)]
    s = sync_settings(parser().parse_args(argv))
    assert (s.resync_s, s.polling, s.max_pinned, s.strict_base) == (5.0, True, 7, False)
    assert s.registry == tmp_path
    s = sync_settings(parser().parse_args([*argv, "--resync", "1", "--max-pinned", "0"]))
    assert (s.resync_s, s.polling, s.max_pinned) == (1.0, True, 0)  # given flags win


def test_public_surface_does_not_import_vllm() -> None:
    for name in server_plugin.__all__:
        assert hasattr(server_plugin, name), name
    code = (
        "import sys, server_plugin, server_plugin.plugin, server_plugin.sidecar; "
        "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class FakeReconciler:
    lazy = False  # every name preloaded: only pinned models are parsed

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.seen: list[str] = []

    async def ensure(self, model: str, held: list[str]) -> Any:
        from server_plugin.failures import Refusal

        self.seen.append(model)
        return Refusal(self.error) if self.error else None

    def release(self, held: list[str]) -> None:
        held.clear()


def call_middleware(reconciler: Any, body: bytes, path: str = "/v1/chat/completions") -> Any:
    from server_plugin.middleware import ModelRequestMiddleware

    received: list[bytes] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        data, more = b"", True
        while more:
            message = await receive()
            data, more = data + message["body"], message["more_body"]
        received.append(data)

    async def scenario() -> None:
        plugin = type(
            "P", (), {"reconciler": reconciler, "max_parse_bytes": 1 << 20, "canary": None}
        )()
        mw = ModelRequestMiddleware(app, plugin)
        chunks = [body[:5], body[5:]]

        async def receive() -> dict[str, Any]:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": []}
        await mw(scope, receive, send)

    asyncio.run(scenario())
    return received, sent


def test_middleware_loads_pinned_versions_and_replays_the_body() -> None:
    rec = FakeReconciler()
    body = json.dumps({"model": "x@v0002", "messages": []}).encode()
    received, sent = call_middleware(rec, body)
    assert rec.seen == ["x@v0002"] and received == [body] and not sent

    rec = FakeReconciler()
    received, _ = call_middleware(rec, json.dumps({"model": "x"}).encode())
    assert rec.seen == [] and received  # no '@': the body is not parsed

    rec = FakeReconciler(error="x@v0003 cannot be served: rank too big")
    received, sent = call_middleware(rec, body)
    assert not received and sent[0]["status"] == 400
    assert b"rank too big" in sent[1]["body"]


def test_serve_port_after_dashes_wins_and_dry_run_after_dashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["serve", "--model", "m", "--registry", str(tmp_path), "--", "--port", "8501", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0  # printed, not launched (the old code exec'd vLLM with --dry-run)
    argv = out.split()
    assert argv.count("--port") == 1 and argv[argv.index("--port") + 1] == "8501"
    assert "--dry-run" not in argv


def test_serve_tool_calling_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cmd(*extra: str) -> list[str]:
        args = parser().parse_args(["serve", "--model", "m", "--registry", str(tmp_path), *extra])
        return serve_command(args)[0]

    c = cmd("--tool-call-parser", "hermes")
    assert "--enable-auto-tool-choice" in c and c[c.index("--tool-call-parser") + 1] == "hermes"
    with pytest.raises(ConfigError, match="no parser known for 'm'"):
        cmd("--tool-call-parser", "auto")
    assert "--enable-auto-tool-choice" not in cmd()
    qwen = parser().parse_args(
        [
            "serve",
            "--model",
            "Qwen/Qwen2.5-7B-Instruct",
            "--registry",
            str(tmp_path),
            "--tool-call-parser",
            "auto",
        ]
    )
    c = serve_command(qwen)[0]
    assert c[c.index("--tool-call-parser") + 1] == "hermes"
    code = main(["serve", "--model", "m", "--registry", str(tmp_path), "--enable-auto-tool-choice"])
    assert code == 1 and "--tool-call-parser" in capsys.readouterr().err
    help_text = subprocess.run(
        [sys.executable, "-m", "agent_finetune.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "llama3_json" in help_text and "hermes" in help_text


def test_tool_parsers_exist_in_vllm() -> None:
    """Every parser serve names is one vLLM registers (read from its source, no import)."""
    import importlib.util

    from agent_finetune.cli.serve import TOOL_PARSERS

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM not installed")
    source = (Path(spec.origin).parent / "tool_parsers" / "__init__.py").read_text()
    for _, name, _ in TOOL_PARSERS:
        assert f'"{name}":' in source, name


def test_serve_sets_and_prints_a_cpu_kv_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr("agent_finetune.cli.serve._on_cpu_build", lambda: True)
    assert main(["serve", "--model", "m", "--registry", str(tmp_path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "VLLM_CPU_KVCACHE_SPACE=4" in captured.out
    assert "VLLM_CPU_KVCACHE_SPACE=4 GiB" in captured.err
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert main(["serve", "--model", "m", "--registry", str(tmp_path), "--dry-run"]) == 0
    assert "VLLM_CPU_KVCACHE_SPACE=2" in capsys.readouterr().out


def test_serve_gives_a_local_base_model_a_readable_name(tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama"
    model.mkdir()
    args = parser().parse_args(["serve", "--model", str(model), "--registry", str(tmp_path)])
    cmd = serve_command(args)[0]
    i = cmd.index("--served-model-name")
    assert cmd[i + 1 : i + 3] == ["tiny-llama", str(model)]
