"""The sidecar's HTTP transport against a fake of vLLM's runtime LoRA API (no vLLM)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import LIMITS, FakeVllmHttp
from helpers import fake_adapter

from agent_finetune.errors import LoadError
from agent_finetune.registry import Registry
from server_plugin.cache import AdapterCache
from server_plugin.reconciler import Reconciler
from server_plugin.sidecar import RUNTIME_FLAG, HttpTransport, adapter_busy


def with_sidecar(
    tmp: Path, fake: FakeVllmHttp, body: Callable[[Registry, Reconciler], Awaitable[None]]
) -> None:
    async def main() -> None:
        client = httpx.AsyncClient(base_url="http://vllm", transport=httpx.MockTransport(fake))
        async with client:
            transport = HttpTransport(client, drain_s=5.0)
            registry = Registry(tmp / "registry")
            cache = AdapterCache(tmp / "cache", LIMITS, grace_s=0)
            rec = Reconciler(registry, cache, transport, retry_base_s=0.01, retry_max_s=0.02)
            await body(registry, rec)

    asyncio.run(main())


def status_of(rec: Reconciler, name: str) -> dict[str, Any]:
    return next(a for a in rec.status()["data"] if a["name"] == name)


def test_unloading_an_unknown_adapter_is_not_an_error(tmp_path: Path) -> None:
    """Finding: the sidecar misread vLLM's 404 body for an unknown adapter as "no runtime
    LoRA API"."""
    fake = FakeVllmHttp()

    async def body(_registry: Registry, rec: Reconciler) -> None:
        await rec.transport.unload("never-loaded")

    with_sidecar(tmp_path, fake, body)
    assert fake.log == [("unload", "never-loaded")]


def test_probe_says_how_to_turn_the_runtime_api_on(tmp_path: Path) -> None:
    fake = FakeVllmHttp(runtime_api=False)

    async def body(_registry: Registry, rec: Reconciler) -> None:
        with pytest.raises(LoadError, match=RUNTIME_FLAG):
            await rec.transport.probe()  # type: ignore[attr-defined]

    with_sidecar(tmp_path, fake, body)
    with_sidecar(tmp_path / "on", FakeVllmHttp(), lambda _r, rec: rec.transport.probe())  # type: ignore[attr-defined]


def test_a_restarted_server_is_loaded_again(tmp_path: Path) -> None:
    """Finding: the sidecar never noticed a vLLM restart (status said live, nothing served)."""
    fake = FakeVllmHttp()

    async def body(registry: Registry, rec: Reconciler) -> None:
        registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
        await rec.reconcile_once()
        assert fake.loras["x"] == fake.loras["x@v0001"]
        fake.restart()
        fake.requests.clear()
        await rec.reconcile_once()
        assert fake.loras["x"] == fake.loras["x@v0001"]
        assert status_of(rec, "x")["state"] == "live"
        fake.requests.clear()
        await rec.reconcile_once()  # steady state: one look at the server per pass
        assert fake.requests == ["/v1/models"]

    with_sidecar(tmp_path, fake, body)


def test_failed_swap_restores_the_previous_version(tmp_path: Path) -> None:
    """Finding: a swap that unloaded the name and then failed to load left it unserved."""
    fake = FakeVllmHttp()

    async def body(registry: Registry, rec: Reconciler) -> None:
        registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
        await rec.reconcile_once()
        v1 = fake.loras["x"]
        registry.publish("x", fake_adapter(tmp_path / "a2", seed=2))
        fake.fail_once["x"] = (500, "InternalServerError")
        await rec.reconcile_once()
        assert fake.loras["x"] == v1  # restored
        st = status_of(rec, "x")
        assert (st["state"], st["live"], st["error_kind"]) == ("retrying", "v0001", "transient")
        await asyncio.sleep(0.05)
        await rec.reconcile_once()
        assert fake.loras["x"] == fake.loras["x@v0002"] != v1
        assert status_of(rec, "x")["live"] == "v0002"

    with_sidecar(tmp_path, fake, body)


def test_4xx_refusal_is_permanent(tmp_path: Path) -> None:
    fake = FakeVllmHttp()

    async def body(registry: Registry, rec: Reconciler) -> None:
        registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
        fake.fail_once["x@v0001"] = (400, "BadRequestError")
        await rec.reconcile_once()
        st = status_of(rec, "x")
        assert (st["state"], st["error_kind"]) == ("failed", "permanent")
        assert "BadRequestError" in st["error"]

    with_sidecar(tmp_path, fake, body)


def test_server_down_is_transient_and_reported(tmp_path: Path) -> None:
    fake = FakeVllmHttp()

    async def body(registry: Registry, rec: Reconciler) -> None:
        registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
        await rec.reconcile_once()
        fake.down = True
        await rec.reconcile_once()
        assert status_of(rec, "x")["live"] is None
        assert "ConnectError" in rec.status()["server_error"]
        fake.down = False
        fake.restart()
        await rec.reconcile_once()
        assert status_of(rec, "x")["live"] == "v0001" and "x" in fake.loras

    with_sidecar(tmp_path, fake, body)


def test_drain_reads_the_servers_request_gauges_not_clocks() -> None:
    """Finding: drain compared the sidecar's clock with the server's and took "no sample"
    for idle."""
    old = time.time() - 3600  # a sample from an hour ago still counts: no clock compared
    info = (
        'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{run}",'
        'waiting_lora_adapters=""}} {ts}\n'
    )
    running = 'vllm:num_requests_running{{engine="0",model_name="m"}} {n}\n'
    waiting = 'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
    assert adapter_busy("", "x")  # no sample: cannot tell, so busy
    assert adapter_busy("# HELP something\n", "x")
    assert not adapter_busy(running.format(n=0.0) + waiting, "x")
    busy = running.format(n=2.0) + waiting
    assert adapter_busy(busy + info.format(run="x,y", ts=old), "x")
    assert not adapter_busy(busy + info.format(run="y", ts=old), "x")
    newest_wins = info.format(run="x", ts=old) + info.format(run="y", ts=old + 1)
    assert not adapter_busy(busy + newest_wins, "x")


def test_drain_does_not_hold_up_other_work(tmp_path: Path) -> None:
    """Finding: the sidecar held the global lock for up to 300 s while draining."""
    fake = FakeVllmHttp()
    fake.metrics = 'vllm:num_requests_running{engine="0"} 1.0\n'  # never idle

    async def body(registry: Registry, rec: Reconciler) -> None:
        rec.transport.drain_s = 30.0  # type: ignore[attr-defined]
        registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
        registry.publish("y", fake_adapter(tmp_path / "b1", seed=3))
        await rec.reconcile_once()
        registry.publish("x", fake_adapter(tmp_path / "a2", seed=2))
        swap = asyncio.create_task(rec.reconcile_once())
        while ("unload", "x") not in fake.log:
            await asyncio.sleep(0.01)
        # x is draining; a pinned load of another name goes ahead meanwhile.
        assert await asyncio.wait_for(rec.ensure_pinned("y@v0001"), 20) is None
        assert not swap.done()
        fake.metrics = 'vllm:num_requests_running{engine="0"} 0.0\n'
        await swap
        assert status_of(rec, "x")["live"] == "v0002"

    with_sidecar(tmp_path, fake, body)
