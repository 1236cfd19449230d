"""Fakes of what the reconciler drives: vLLM's LoRA table in-process, and vLLM's runtime
LoRA HTTP API (for the sidecar's ``HttpTransport``); and a reconciler on them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from helpers import FAKE_BASE_CONFIG

from agent_finetune.errors import LoadError
from agent_finetune.registry import Registry
from server_plugin.cache import AdapterCache, Limits
from server_plugin.preload import Usage
from server_plugin.reconciler import Reconciler
from server_plugin.settings import Settings

LIMITS = Limits(max_rank=16, base_model="fake-base", base_config=FAKE_BASE_CONFIG)


class FakeTransport:
    """Records calls; serves a dict of name -> path like vLLM's lora_requests.

    Like vLLM, it reads the adapter from its path on load (a missing path is an error) and
    refuses to load a second path under a loaded name. ``faults`` are raised by the next
    loads, in order.
    """

    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.calls: list[tuple[str, ...]] = []
        self.refuse: set[str] = set()
        self.faults: list[BaseException] = []

    async def served(self) -> dict[str, str]:
        return dict(self.table)

    async def load(self, served_name: str, path: str) -> None:
        self.calls.append(("load", served_name))
        if self.faults:
            raise self.faults.pop(0)
        if served_name in self.refuse:
            raise LoadError(f"vLLM refused to load {path}: boom")
        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise LoadError(f"{path}: no adapter here (the engine would die re-reading it)")
        if self.table.get(served_name, path) != path:
            raise LoadError(f"{served_name} is already loaded from another path")
        self.table[served_name] = path

    async def repoint(self, name: str, target: str) -> None:
        self.calls.append(("repoint", name, target))
        self.table[name] = self.table[target]

    async def unload(self, served_name: str) -> None:
        self.calls.append(("unload", served_name))
        self.table.pop(served_name, None)

    def loads(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "load"]


class FakeVllmHttp:
    """vLLM's ``/v1/models``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` and
    ``/metrics``, with vLLM's status codes and error bodies; for ``httpx.MockTransport``."""

    def __init__(self, base_model: str = "base", *, runtime_api: bool = True) -> None:
        self.base_model = base_model
        self.runtime_api = runtime_api
        self.loras: dict[str, str] = {}
        self.fail_once: dict[str, tuple[int, str]] = {}  # lora_name -> (status, error type)
        self.requests: list[str] = []
        self.metrics = 'vllm:num_requests_running{engine="0"} 0.0\n'
        self.down = False
        self.log: list[tuple[str, str]] = []

    def restart(self) -> None:
        """What a restarted vLLM serves: only its base model."""
        self.loras.clear()

    @staticmethod
    def _error(status: int, message: str, err_type: str) -> httpx.Response:
        body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
        return httpx.Response(status, json=body)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        self.requests.append(path)
        if path == "/v1/models":
            cards = [{"id": self.base_model, "root": self.base_model, "parent": None}]
            cards += [
                {"id": n, "root": p, "parent": self.base_model} for n, p in self.loras.items()
            ]
            return httpx.Response(200, json={"object": "list", "data": cards})
        if path == "/metrics":
            return httpx.Response(200, text=self.metrics)
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            if not self.runtime_api:
                return httpx.Response(404, json={"detail": "Not Found"})
            body = json.loads(request.content)
            name = body.get("lora_name")
            if path.endswith("unload_lora_adapter"):
                self.log.append(("unload", name))
                if name not in self.loras:
                    return self._error(
                        404, f"The lora adapter '{name}' cannot be found.", "NotFoundError"
                    )
                del self.loras[name]
                return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed")
            lora_path = body.get("lora_path")
            self.log.append(("load", name))
            if name in self.loras:
                return self._error(
                    400,
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                )
            if name in self.fail_once:
                status, err_type = self.fail_once.pop(name)
                return self._error(status, "add_lora failed", err_type)
            if not Path(lora_path).is_dir():
                return self._error(404, f"Loading lora {name} failed", "NotFoundError")
            self.loras[name] = lora_path
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added")
        return httpx.Response(404, json={"detail": "Not Found"})


class BlockingTransport(FakeTransport):
    """Loads wait for ``gate``; counts loads running at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.running = 0
        self.peak = 0

    async def load(self, served_name: str, path: str) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            await super().load(served_name, path)
        finally:
            self.running -= 1


class SlowTransport(FakeTransport):
    """Loads take a moment (like vLLM's), and the most loads ever in flight is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most_in_flight = 0

    async def load(self, served_name: str, path: str) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            await super().load(served_name, path)
        finally:
            self.in_flight -= 1


def make_reconciler(
    tmp: Path,
    transport: FakeTransport | None = None,
    *,
    grace_s: float = 0.0,
    max_bytes: int | None = None,
    engine_bound: int | None = None,
    usage: Usage | None = None,
    **settings: Any,
) -> tuple[Registry, FakeTransport, Reconciler]:
    """A registry under ``tmp``, a fake server and a reconciler on both (2 pinned, nothing
    staged ahead, fast retries, a cache with no grace period unless given)."""
    registry = Registry(tmp / "registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    transport = transport or FakeTransport()
    cache = AdapterCache(tmp / "cache", LIMITS, max_bytes=max_bytes, grace_s=grace_s)
    options = {
        "max_pinned": 2,
        "max_staged": 0,
        "retry_base_s": 0.01,
        "retry_max_s": 0.02,
        **settings,
    }
    rec = Reconciler(
        registry, cache, transport, Settings(**options), engine_bound=engine_bound, usage=usage
    )
    return registry, transport, rec


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def status_of(rec: Reconciler, name: str) -> dict[str, Any]:
    return next(a for a in rec.status()["data"] if a["name"] == name)


def serves(transport: FakeTransport, name: str, version: str) -> bool:
    """Whether ``name`` resolves to what ``name@version`` serves."""
    return name in transport.table and transport.table[name] == transport.table.get(
        f"{name}@{version}"
    )
