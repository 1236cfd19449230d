"""The endpoint plugin (``server_plugin.plugin``) without vLLM: its in-process transport and
its start-up refusals. Its request middleware: test_middleware.py; live: test_scenario_*."""

from __future__ import annotations

import asyncio
import types
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from agent_finetune.errors import LoadError, ServerUnavailableError
from server_plugin import compat
from server_plugin.plugin import EndpointPlugin, VllmTransport


class Models:
    """The members of ``compat.ServingModels`` the transport uses."""

    def __init__(self, refusal: tuple[int, str] | None = None) -> None:
        self.loaded: dict[str, compat.Served] = {}
        self.refusal = refusal

    def get(self, name: str) -> compat.Served | None:
        return self.loaded.get(name)

    async def load_detail(self, name: str, path: str) -> tuple[int, str] | None:
        if self.refusal is None:
            self.loaded[name] = compat.Served(name, path, len(self.loaded) + 1)
        return self.refusal

    def is_base_model(self, name: str) -> bool:
        return name == "base"

    def point(self, name: str, target: str) -> bool:
        if target not in self.loaded:
            return False
        self.loaded[name] = self.loaded[target]
        return True


def test_the_transport_never_reloads_in_place_and_sorts_refusals_by_kind() -> None:
    async def scenario() -> None:
        transport = VllmTransport(Models())  # type: ignore[arg-type]
        await transport.load("x@v0001", "/c/1")
        await transport.load("x@v0001", "/c/1")  # the same: nothing to do
        with pytest.raises(LoadError, match="never reloaded in place"):
            await transport.load("x@v0001", "/c/other")
        with pytest.raises(LoadError, match="also a served base model name"):
            await transport.repoint("base", "x@v0001")
        with pytest.raises(LoadError, match="is not loaded"):
            await transport.repoint("x", "x@v0009")
        refused = VllmTransport(Models((400, "rank too big")))  # type: ignore[arg-type]
        with pytest.raises(LoadError, match="rank too big") as e:
            await refused.load("y@v0001", "/c/y")
        assert not isinstance(e.value, ServerUnavailableError)  # permanent
        failing = VllmTransport(Models((500, "engine died")))  # type: ignore[arg-type]
        with pytest.raises(ServerUnavailableError):  # retried with backoff
            await failing.load("y@v0001", "/c/y")

    asyncio.run(scenario())


def engine() -> Any:
    lora = types.SimpleNamespace(max_lora_rank=16, max_cpu_loras=8)
    parallel = types.SimpleNamespace(_api_process_count=1)
    return types.SimpleNamespace(
        vllm_config=types.SimpleNamespace(lora_config=lora, parallel_config=parallel)
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "AGENT_FINETUNE_REGISTRY is not set"),
        ({"AGENT_FINETUNE_MAX_PINNED": "-1"}, "AGENT_FINETUNE_MAX_PINNED='-1'"),
    ],
)
def test_bad_settings_disable_the_plugin_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    monkeypatch.delenv("AGENT_FINETUNE_REGISTRY", raising=False)
    if env:
        monkeypatch.setenv("AGENT_FINETUNE_REGISTRY", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = EndpointPlugin()
    plugin.internals = types.SimpleNamespace()  # type: ignore[assignment]
    asyncio.run(plugin.init_state(engine(), types.SimpleNamespace(), Namespace(model="m")))
    assert plugin.reconciler is None and plugin.error is not None and message in plugin.error
