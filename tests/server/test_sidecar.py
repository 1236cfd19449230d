"""The sidecar (``server_plugin.sidecar``) against fakes of vLLM's runtime LoRA API (no vLLM):
its HTTP transport, its drain, and the servers it refuses (vLLM 0.26-0.30 with prefix
caching: a reloaded name answered from the old version's cached prompt KV on GPU vLLM 0.26)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import LIMITS, FakeVllmHttp
from helpers import fake_adapter
from hypothesis import given
from hypothesis import strategies as st

from agent_finetune.errors import LoadError
from agent_finetune.registry import Registry
from server_plugin.cache import AdapterCache
from server_plugin.compat import PREFIX_CACHE_KEYS_LORA_PATH, stale_prefix_cache_error
from server_plugin.reconciler import Reconciler
from server_plugin.settings import Settings
from server_plugin.sidecar import (
    RUNTIME_FLAG,
    HttpTransport,
    SyncOptions,
    adapter_busy,
    server_facts,
    sync,
)


def with_sidecar(
    tmp: Path, fake: FakeVllmHttp, body: Callable[[Registry, Reconciler], Awaitable[None]]
) -> None:
    async def main() -> None:
        client = httpx.AsyncClient(base_url="http://vllm", transport=httpx.MockTransport(fake))
        async with client:
            transport = HttpTransport(client, drain_s=5.0)
            registry = Registry(tmp / "registry")
            cache = AdapterCache(tmp / "cache", LIMITS, grace_s=0)
            rec = Reconciler(
                registry, cache, transport, Settings(retry_base_s=0.01, retry_max_s=0.02)
            )
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
        assert await asyncio.wait_for(rec.ensure("y@v0001"), 20) is None
        assert not swap.done()
        fake.metrics = 'vllm:num_requests_running{engine="0"} 0.0\n'
        await swap
        assert status_of(rec, "x")["live"] == "v0002"

    with_sidecar(tmp_path, fake, body)


def test_a_status_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding: the sidecar caught OSError around the status write, but the write raises
    RegistryError (a RuntimeError): a full or read-only disk ended `sync --once` with a
    traceback, and the loop's hook with a generic log line."""
    registry = Registry(tmp_path / "registry")
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    fake = FakeVllmHttp(base_model="fake-base")
    settings = Settings(registry=registry.root, cache_dir=tmp_path / "cache", strict_base=False)
    options = SyncOptions(server="http://vllm", once=True)
    assert asyncio.run(sync(options, settings, httpx.MockTransport(fake))) == 0
    status = next((tmp_path / "cache").glob("sidecar-*/status.json"))
    status.unlink()
    status.mkdir()  # the next write cannot replace it
    with caplog.at_level(logging.ERROR):
        assert asyncio.run(sync(options, settings, httpx.MockTransport(fake))) == 0
    assert "cannot write the status" in caplog.text and "Is a directory" in caplog.text


def test_a_name_unloaded_by_the_sidecar_is_drained_before_it_loads_again(tmp_path: Path) -> None:
    """vLLM gives a reloaded name a new LoRA id; its old requests must finish first."""
    fake = FakeVllmHttp()
    fake.metrics = 'vllm:num_requests_running{engine="0"} 1.0\n'  # busy

    async def body(registry: Registry, rec: Reconciler) -> None:
        transport = rec.transport
        assert isinstance(transport, HttpTransport)
        transport.drain_s = 0.3
        path = str(fake_adapter(tmp_path / "a1", seed=1))
        await transport.load("x@v0001", path)
        t0 = time.monotonic()
        await transport.load("y@v0001", path)  # never unloaded: no wait
        assert time.monotonic() - t0 < 0.3
        await transport.unload("x@v0001")
        t0 = time.monotonic()
        await transport.load("x@v0001", path)
        assert time.monotonic() - t0 >= 0.3  # waited for the old requests (up to drain_s)

    with_sidecar(tmp_path, fake, body)


def cache_info(prefix_caching: str) -> str:
    return (
        "# TYPE vllm:cache_config_info gauge\n"
        f'vllm:cache_config_info{{block_size="16",enable_prefix_caching="{prefix_caching}",'
        'engine="0",gpu_memory_utilization="0.9"} 1.0\n'
    )


def fake_vllm(version: str | None, metrics: str, posts: list[str]) -> httpx.MockTransport:
    """A vLLM API server's read routes; records every POST (a load or unload)."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST":
            posts.append(path)
            return httpx.Response(200, json={})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base", "root": "base"}]})
        if path == "/version" and version is not None:
            return httpx.Response(200, json={"version": version})
        if path == "/metrics":
            return httpx.Response(200, text=metrics)
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handle)


@given(
    major=st.just(0),
    minor=st.integers(0, 40),
    patch=st.integers(0, 3),
    flag=st.sampled_from([True, False, None]),
)
def test_only_name_keyed_lines_with_prefix_caching_are_refused(
    major: int, minor: int, patch: int, flag: bool | None
) -> None:
    error = stale_prefix_cache_error(f"{major}.{minor}.{patch}", flag)
    name_keyed = (major, minor) < PREFIX_CACHE_KEYS_LORA_PATH
    assert (error is not None) == (name_keyed and flag is not False)
    if error:
        assert "--no-enable-prefix-caching" in error and "0.31" in error


@pytest.mark.parametrize(
    ("version", "metrics", "facts"),
    [
        ("0.26.0", cache_info("True"), ("0.26.0", True)),
        ("0.30.0+cpu", cache_info("False"), ("0.30.0+cpu", False)),
        (None, "", (None, None)),  # a server that says neither
    ],
)
def test_server_facts_reads_version_and_prefix_caching(
    version: str | None, metrics: str, facts: tuple[str | None, bool | None]
) -> None:
    async def read() -> tuple[str | None, bool | None]:
        transport = fake_vllm(version, metrics, [])
        async with httpx.AsyncClient(base_url="http://vllm", transport=transport) as client:
            return await server_facts(client)

    assert asyncio.run(read()) == facts


@pytest.mark.parametrize("version", ["0.26.0", "0.30.0"])
def test_sync_refuses_a_name_keyed_prefix_cache_before_loading_anything(
    tmp_path: Path, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish("side", fake_adapter(tmp_path / "a", base_model="base"))
    posts: list[str] = []
    options = SyncOptions(server="http://vllm", once=True)
    settings = Settings(registry=registry.root, cache_dir=tmp_path / "cache", strict_base=False)
    code = asyncio.run(sync(options, settings, fake_vllm(version, cache_info("True"), posts)))
    assert code == 2
    assert posts == []  # no load, no unload
    err = capsys.readouterr().err
    assert f"vLLM {version} keys its prefix cache by LoRA name alone" in err
    assert "--no-enable-prefix-caching" in err
