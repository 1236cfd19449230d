"""Starting vLLM with the plugin (``server_plugin.launch``): the command line, its
environment, and a server that dies or hangs before it is ready."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers import fake_adapter

from agent_finetune.errors import ServerStartError
from agent_finetune.registry import Registry
from server_plugin.launch import (
    build_command,
    build_env,
    default_max_lora_rank,
    plugins_env_value,
    start_server,
)
from server_plugin.settings import LAZY_MAX_CPU_LORAS, Settings


def test_max_lora_rank_fits_the_registry(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    assert default_max_lora_rank(registry.root) == 16
    registry.publish("big", fake_adapter(tmp_path / "a", r=32))
    assert default_max_lora_rank(registry.root) == 32
    cmd = build_command("m", registry.root, extra_args=["--max-loras", "2"])
    assert cmd.count("--max-loras") == 1


def test_plugins_env_keeps_other_plugins() -> None:
    assert plugins_env_value("foo,bar") == "foo,bar,agent_finetune"
    assert plugins_env_value("agent_finetune") == "agent_finetune"
    assert "agent_finetune" in plugins_env_value(None).split(",")


def test_max_cpu_loras_default_is_bounded_unless_everything_is_preloaded(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    for i in range(200):  # names() needs only the folders
        (root / f"n{i:03d}" / "versions").mkdir(parents=True)

    def cpu_loras(preload: str = "auto", **kw: Any) -> int:
        cmd = build_command("m", root, serving=Settings(preload=preload), **kw)
        return int(cmd[cmd.index("--max-cpu-loras") + 1])

    assert cpu_loras() == LAZY_MAX_CPU_LORAS  # auto: 200 names do not fit
    assert cpu_loras(preload="none") == LAZY_MAX_CPU_LORAS
    assert cpu_loras(preload="all") == 208  # every name + 4 pinned + 4 staged, as asked
    assert cpu_loras(preload="recent:100") == 100 + 4 + 4 + 8
    assert cpu_loras(max_cpu_loras=9) == 9
    assert cpu_loras(extra_args=["--max-cpu-loras", "5"]) == 5


def test_build_env_adds_the_plugin_and_only_the_given_settings(tmp_path: Path) -> None:
    env = build_env(tmp_path, base_env={"PATH": "/bin"}, settings={"AGENT_FINETUNE_POLLING": "1"})
    assert env["AGENT_FINETUNE_REGISTRY"] == str(tmp_path) and env["PATH"] == "/bin"
    assert env["AGENT_FINETUNE_POLLING"] == "1"
    assert "agent_finetune" in env["VLLM_PLUGINS"].split(",")
    assert not [k for k in env if k.startswith("AGENT_FINETUNE_MAX")]


def fake_vllm(folder: Path, script: str) -> str:
    """An executable that stands in for ``python`` (``python -m vllm...`` runs it)."""
    path = folder / "fake-python"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_server_that_exits_or_hangs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="exited with code 3 before it was ready"):
        start_server("m", None, python=fake_vllm(tmp_path, "exit 3"), log_path=tmp_path / "a.log")
    hung = fake_vllm(tmp_path, "exec sleep 60")
    with pytest.raises(ServerStartError, match="not ready within 1s"):
        start_server("m", None, python=hung, timeout=1, log_path=tmp_path / "b.log")
    assert isinstance(ServerStartError("x"), RuntimeError)  # what callers already catch


def test_start_server_sizes_vllm_from_the_settings_it_passes(tmp_path: Path) -> None:
    """The plugin's settings (given or inherited) size --max-cpu-loras, read once."""
    root = tmp_path / "registry"
    for i in range(100):
        (root / f"n{i:03d}" / "versions").mkdir(parents=True)
    log = tmp_path / "argv.log"
    python = fake_vllm(tmp_path, f'echo "$@" > {log}')
    options: dict[str, Any] = {"python": python, "wait": False}
    server = start_server("m", root, settings={"AGENT_FINETUNE_PRELOAD": "all"}, **options)
    server.process.wait(30)
    argv = log.read_text().split()
    assert argv[argv.index("--max-cpu-loras") + 1] == "108"  # 100 names + 4 pinned + 4 staged
    env = {**os.environ, "AGENT_FINETUNE_MAX_PINNED": "6"}
    server = start_server("m", root, env=env, settings={"AGENT_FINETUNE_PRELOAD": "all"}, **options)
    server.process.wait(30)
    argv = log.read_text().split()
    assert argv[argv.index("--max-cpu-loras") + 1] == "110"  # 6 pinned
