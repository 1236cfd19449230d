"""Request-time loads (``server_plugin.demand``): lazy names and pinned ``name@vNNNN`` on one
road, with the fake transport (no vLLM, no torch)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from fakes import BlockingTransport, FakeTransport, SlowTransport, make_reconciler, run
from helpers import fake_adapter, write_version

from agent_finetune.registry import Registry
from server_plugin.failures import Refusal
from server_plugin.middleware import ModelRequestMiddleware
from server_plugin.reconciler import Reconciler


def lazy(
    tmp: Path, n_names: int, *, preload: str = "none", engine_bound: int = 64, **kw: Any
) -> tuple[Registry, SlowTransport, Reconciler]:
    """``n_names`` names (n00, n01, ...) of one adapter, on a server that preloads none."""
    transport = SlowTransport()
    registry, _, rec = make_reconciler(
        tmp,
        transport,
        engine_bound=engine_bound,
        usage=kw.pop("usage", None),
        **{"max_pinned": 0, "preload": preload, **kw},
    )
    source = fake_adapter(tmp / "adapter", seed=1)
    for i in range(n_names):
        registry.publish(f"n{i:02d}", source)
    return registry, transport, rec


def states(rec: Reconciler) -> dict[str, str]:
    return {a["name"]: a["state"] for a in rec.status()["data"]}


def copies(rec: Reconciler) -> list[Path]:
    return sorted(p for p in rec.cache.root.rglob("v0*") if p.is_dir())


def middleware_for(rec: Reconciler, app: Any) -> Any:
    plugin = type("Plugin", (), {"reconciler": rec, "max_parse_bytes": 1 << 20, "canary": None})()
    return ModelRequestMiddleware(app, plugin)


def vllm_app(transport: FakeTransport, slow: str) -> tuple[Any, asyncio.Event, dict[str, bool]]:
    """An app that records whether each request's model resolves when "vLLM" looks it up;
    the ``slow`` model's lookup waits for the returned event."""
    looks_up, found = asyncio.Event(), {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        model = json.loads((await receive())["body"])["model"]
        if model == slow:
            await looks_up.wait()
        found[model] = model in transport.table

    return app, looks_up, found


async def request(middleware: Any, model: str) -> None:
    body = json.dumps({"model": model, "messages": []}).encode()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await middleware(scope, receive, send)


# -- pinned versions --------------------------------------------------------------------


def test_pinned_versions_are_bounded_lru(tmp_path: Path) -> None:
    registry, transport, rec = make_reconciler(tmp_path)
    tmp = tmp_path
    for seed in range(5):
        registry.publish("x", fake_adapter(tmp / f"a{seed}", seed=seed), make_current=seed == 4)
    run(rec.reconcile_once())
    assert run(rec.ensure("x@v0001")) is None
    assert run(rec.ensure("x@v0002")) is None
    assert run(rec.ensure("x@v0001")) is None  # touch: v0002 is now the oldest
    assert run(rec.ensure("x@v0003")) is None
    assert "x@v0002" not in transport.table
    assert {"x@v0001", "x@v0003", "x@v0005", "x"} == set(transport.table)
    assert run(rec.ensure("x@v0099")) is None  # unknown: the server answers 404
    assert run(rec.ensure("not a model")) is None
    assert "x@v0099" not in transport.table


def test_unknown_pins_do_not_queue_behind_a_swap(tmp_path: Path) -> None:
    """Finding: existence checks of pins ran under the global lock, behind real swaps."""
    registry, _, rec = make_reconciler(tmp_path, transport := BlockingTransport())
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))

    async def scenario() -> None:
        swap = asyncio.create_task(rec.reconcile_once())
        while transport.running == 0:  # the swap is now inside its load
            await asyncio.sleep(0.01)
        # Would wait forever behind the blocked swap if it took the swap's lock.
        for _ in range(50):
            assert await asyncio.wait_for(rec.ensure("x@v0099"), 30) is None
        transport.gate.set()
        await swap

    run(scenario())


def test_unknown_models_cost_no_registry_scan(tmp_path: Path, monkeypatch: Any) -> None:
    """Unknown versions (client input) are answered from the catalog the pass keeps: no
    per-model memory, and a name's version list is read once per change of its folder."""
    registry, _, rec = make_reconciler(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    old = time.time() - 60  # older than the racy window: the catalog may trust the stamp
    os.utime(registry.name_dir("x") / "versions", (old, old))
    run(rec.reconcile_once())
    listed: list[str] = []
    real = registry.versions
    monkeypatch.setattr(registry, "versions", lambda n: listed.append(n) or real(n))
    for i in range(20):
        assert run(rec.ensure(f"x@v{99 + i:04d}")) is None
        assert run(rec.ensure(f"nobody{i}@v0001")) is None
    assert listed in ([], ["x"])  # at most once (staging's pass may have read it already)
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())  # a pass (a registry event) sees the new version
    assert run(rec.ensure("x@v0002")) is None and rec.is_loaded("x@v0002")


def test_rejected_pins_are_remembered(tmp_path: Path, monkeypatch: Any) -> None:
    """Finding: a rejected pin was copied, hashed and validated again on every request."""
    registry, _, rec = make_reconciler(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    write_version(registry, "x", fake_adapter(tmp_path / "bad", seed=2, r=32), make_current=False)
    run(rec.reconcile_once())
    prepares = []
    real = rec.cache.prepare
    monkeypatch.setattr(rec.cache, "prepare", lambda *a, **k: prepares.append(a) or real(*a, **k))
    for _ in range(10):
        refusal = run(rec.ensure("x@v0002"))
        assert refusal is not None and refusal.status == 400 and "max-lora-rank" in refusal.message
    assert len(prepares) == 1


def test_concurrent_pins_share_one_load_and_loads_are_bounded(tmp_path: Path) -> None:
    transport = BlockingTransport()
    registry, _, rec = make_reconciler(tmp_path, transport, max_pinned=8, max_loads=2)
    for seed in range(6):
        registry.publish("x", fake_adapter(tmp_path / f"a{seed}", seed=seed), make_current=False)

    async def scenario() -> None:
        await rec.reconcile_once()  # (no current version: nothing to load)
        same = [asyncio.create_task(rec.ensure("x@v0001")) for _ in range(5)]
        others = [asyncio.create_task(rec.ensure(f"x@v000{i}")) for i in range(2, 7)]
        await asyncio.sleep(0.2)
        transport.gate.set()
        assert await asyncio.gather(*same, *others) == [None] * 10

    run(scenario())
    assert transport.loads().count("x@v0001") == 1
    assert transport.peak <= 2


def test_pins_of_never_current_versions_can_be_refused(tmp_path: Path) -> None:
    registry, _, rec = make_reconciler(tmp_path, pins="current")
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2))
    for seed in (3, 4):
        registry.publish("x", fake_adapter(tmp_path / f"a{seed}", seed=seed), make_current=False)
    # Entries that name a version without making it current: a refused gate, a canary.
    registry.log_event("x", "gate", **{"from": "v0002", "to": "v0003"}, decision="refuse")
    registry.log_event("x", "canary_start", **{"from": "v0002", "to": "v0004"}, weight=10.0)
    registry.log_event("x", "canary_abort", **{"from": "v0002", "to": "v0004"})
    run(rec.reconcile_once())
    assert run(rec.ensure("x@v0001")) is None  # was current once
    for never in ("x@v0003", "x@v0004"):
        refusal = run(rec.ensure(never))
        assert refusal is not None and "AGENT_FINETUNE_PINS" in refusal.message, never
    _, _, rec_any = make_reconciler(tmp_path)  # the same registry, the default policy
    run(rec_any.reconcile_once())
    assert run(rec_any.ensure("x@v0003")) is None  # the default allows it


def test_pin_flood_is_bounded_by_cache_bytes(tmp_path: Path) -> None:
    """Finding: the cache grew to every version within its grace period."""
    registry = Registry(tmp_path / "registry")
    for seed in range(12):
        registry.publish(
            "x", fake_adapter(tmp_path / f"a{seed}", seed=seed), make_current=seed == 0
        )
    size = sum(
        p.stat().st_size for p in registry.version_dir("x", "v0001").iterdir() if p.is_file()
    )
    _, transport, rec = make_reconciler(tmp_path, max_bytes=5 * size, grace_s=3600)
    cache = rec.cache
    run(rec.reconcile_once())
    refusals = [run(rec.ensure(f"x@v{n:04d}")) for n in range(2, 13)]
    assert cache.bytes <= 5 * size
    assert any(r is not None and r.status == 503 and "MAX_BYTES" in r.message for r in refusals)
    for path in transport.table.values():
        assert Path(path, "adapter_model.safetensors").is_file()


# -- lazy names ---------------------------------------------------------------------------


def test_lazy_start_reads_metadata_only(tmp_path: Path) -> None:
    _, transport, rec = lazy(tmp_path, 12)
    asyncio.run(rec.reconcile_once())
    assert transport.calls == []  # nothing loaded
    assert copies(rec) == []  # nothing copied
    assert set(states(rec).values()) == {"lazy"}
    assert rec.lazy_names() == [f"n{i:02d}" for i in range(12)]  # /v1/models lists them
    assert rec.status()["preload"]["policy"] == "none"


def test_first_request_loads_the_name_which_then_follows_current(tmp_path: Path) -> None:
    registry, transport, rec = lazy(tmp_path, 3)

    async def scenario() -> None:
        await rec.reconcile_once()
        assert await rec.ensure("n01") is None
        assert transport.table["n01"] == transport.table["n01@v0001"]
        assert states(rec)["n01"] == "live" and states(rec)["n00"] == "lazy"
        assert await rec.ensure("n01") is None  # served now: a hit, no load
        assert transport.loads() == ["n01@v0001"]
        assert await rec.ensure("nobody") is None  # not ours: vLLM answers 404
        registry.publish("n01", fake_adapter(tmp_path / "b", seed=2))
        registry.publish("n02", fake_adapter(tmp_path / "b", seed=2))
        await rec.reconcile_once()
        # The loaded lazy name swaps like a preloaded one; the unloaded one stays lazy.
        assert transport.table["n01"] == transport.table["n01@v0002"]
        assert "n02" not in transport.table and states(rec)["n02"] == "lazy"

    asyncio.run(scenario())
    preload = rec.status()["preload"]
    assert (preload["hits"], preload["misses"]) == (1, 1)


def test_concurrent_first_requests_share_one_load_and_loads_are_bounded(
    tmp_path: Path,
) -> None:
    _, transport, rec = lazy(tmp_path, 6, max_loads=2)

    async def scenario() -> list[Refusal | None]:
        await rec.reconcile_once()
        same = [rec.ensure("n00") for _ in range(16)]
        others = [rec.ensure(f"n{i:02d}") for i in range(1, 6) for _ in range(3)]
        return list(await asyncio.gather(*same, *others))

    results = asyncio.run(scenario())
    assert results == [None] * 31
    assert transport.loads().count("n00@v0001") == 1
    assert sorted(transport.loads()) == [f"n{i:02d}@v0001" for i in range(6)]
    assert transport.most_in_flight == 2  # AGENT_FINETUNE_MAX_LOADS


def test_loaded_lazy_names_and_their_copies_stay_bounded(tmp_path: Path) -> None:
    _, transport, rec = lazy(tmp_path, 14, engine_bound=4, max_loads=1)

    async def scenario() -> None:
        await rec.reconcile_once()
        for rnd in range(2):
            for i in range(14):
                assert await rec.ensure(f"n{i:02d}") is None
                assert f"n{i:02d}" in transport.table  # served when its request goes on
                public = [n for n in transport.table if "@" not in n]
                assert len(public) <= rec.demand.lazy_capacity == 4
                await rec.reconcile_once()  # deletes released copies (grace 0)
                assert len(copies(rec)) <= 4, (rnd, i)

    asyncio.run(scenario())
    assert len(transport.loads()) == 28  # evicted names load again on their next request
    assert sum(s == "lazy" for s in states(rec).values()) == 10


def test_a_refused_lazy_name_is_refused_without_reloading(tmp_path: Path) -> None:
    registry, transport, rec = lazy(tmp_path, 1)
    bad = fake_adapter(tmp_path / "bad", seed=3, r=32)  # above the server's rank 16
    write_version(registry, "n00", bad)

    async def scenario() -> tuple[Refusal | None, Refusal | None]:
        await rec.reconcile_once()
        return await rec.ensure("n00"), await rec.ensure("n00")

    first, second = asyncio.run(scenario())
    assert first is not None and first.status == 400 and "rank" in first.message
    assert second == first
    assert transport.loads() == []  # refused by validation, once; never handed to vLLM
    assert states(rec)["n00"] == "failed"


def test_middleware_loads_a_lazy_name_before_the_app_sees_the_request(tmp_path: Path) -> None:
    _, transport, rec = lazy(tmp_path, 2)
    seen: list[tuple[str, bool]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        seen.append((body["model"], body["model"] in transport.table))

    plugin = type("Plugin", (), {"reconciler": rec, "max_parse_bytes": 1 << 20, "canary": None})()
    middleware = ModelRequestMiddleware(app, plugin)  # type: ignore[arg-type]

    async def request(model: str) -> None:
        body = json.dumps({"model": model, "messages": []}).encode()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Any) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        await middleware(scope, receive, send)

    async def scenario() -> None:
        await rec.reconcile_once()
        await asyncio.gather(request("n01"), request("n01"), request("other"))

    asyncio.run(scenario())
    assert sorted(seen) == [("n01", True), ("n01", True), ("other", False)]
    assert transport.loads() == ["n01@v0001"]


def test_a_request_arriving_while_its_name_loads_waits_for_that_load(tmp_path: Path) -> None:
    """Run 2 of bench/scale.py: a second request for a name whose load had started passed
    straight through (the name was no longer lazy, not yet served) and vLLM answered 404."""
    _, transport, rec = lazy(tmp_path, 1)

    async def scenario() -> bool:
        await rec.reconcile_once()
        first = asyncio.ensure_future(rec.ensure("n00"))
        while transport.in_flight == 0:  # the first request's load has reached vLLM
            await asyncio.sleep(0.001)
        assert await rec.ensure("n00") is None
        served = "n00" in transport.table  # what vLLM would find for the second request
        await first
        return served

    assert asyncio.run(scenario())
    assert transport.loads() == ["n00@v0001"]


# -- requests in flight (issue 25) ------------------------------------------------------
def test_a_pinned_version_stays_loaded_until_its_request_ends(tmp_path: Path) -> None:
    """Finding: with room for one pinned version, a second pin unloaded the first one after
    its request passed the middleware but before vLLM looked the model up (a 404)."""
    registry, transport, rec = make_reconciler(tmp_path, max_pinned=1)
    for seed in range(3):
        registry.publish(
            "x", fake_adapter(tmp_path / f"a{seed}", seed=seed), make_current=seed == 0
        )
    app, vllm_looks_up, found = vllm_app(transport, "x@v0002")

    async def scenario() -> None:
        await rec.reconcile_once()
        middleware = middleware_for(rec, app)
        first = asyncio.ensure_future(request(middleware, "x@v0002"))
        while "x@v0002" not in transport.table:
            await asyncio.sleep(0.001)
        await request(middleware, "x@v0003")  # needs room: x@v0002 is the oldest pin
        vllm_looks_up.set()
        await first
        await rec.reconcile_once()  # released: the bound holds again

    run(scenario())
    assert found == {"x@v0002": True, "x@v0003": True}
    assert "x@v0002" not in transport.table and "x@v0003" in transport.table


def test_a_lazy_name_stays_loaded_until_its_request_ends(tmp_path: Path) -> None:
    """The same for lazy names: another name's first request evicts the least recently used
    lazy name, never one whose request vLLM has not looked up yet."""
    _, transport, rec = lazy(tmp_path, 4, engine_bound=2, max_loads=1)
    app, vllm_looks_up, found = vllm_app(transport, "n00")

    async def scenario() -> None:
        await rec.reconcile_once()
        assert rec.demand.lazy_capacity == 2
        middleware = middleware_for(rec, app)
        first = asyncio.ensure_future(request(middleware, "n00"))
        while "n00" not in transport.table:
            await asyncio.sleep(0.001)
        for name in ("n01", "n02", "n03"):
            await request(middleware, name)
        vllm_looks_up.set()
        await first

    run(scenario())
    assert found == {"n00": True, "n01": True, "n02": True, "n03": True}


def test_a_load_does_not_queue_behind_slow_ones_past_its_deadline(tmp_path: Path) -> None:
    """Finding: with two slow loads running, every other load waited for a slot with no
    deadline (its request hung)."""
    transport = BlockingTransport()
    registry, _, rec = make_reconciler(
        tmp_path, transport, max_pinned=8, max_loads=2, load_wait_s=0.2
    )
    for seed in range(3):
        registry.publish("x", fake_adapter(tmp_path / f"a{seed}", seed=seed), make_current=False)

    async def scenario() -> None:
        await rec.reconcile_once()
        slow = [asyncio.ensure_future(rec.ensure(f"x@v000{i}")) for i in (1, 2)]
        while transport.running < 2:
            await asyncio.sleep(0.001)
        t0 = time.monotonic()
        refusal = await asyncio.wait_for(rec.ensure("x@v0003"), 10)
        assert refusal is not None and refusal.status == 503, refusal
        assert "AGENT_FINETUNE_LOAD_WAIT_S" in refusal.message
        assert time.monotonic() - t0 < 5
        transport.gate.set()
        assert await asyncio.gather(*slow) == [None, None]
        assert await rec.ensure("x@v0003") is None  # its retry gets a slot

    run(scenario())


def test_a_pin_right_after_its_publish_loads_before_the_next_pass(tmp_path: Path) -> None:
    """Found on the H200: a pinned request sent right after publish (before the pass the
    publish wakes) got vLLM's 404: the catalog's version list was the last pass's."""
    registry, transport, rec = make_reconciler(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    old = time.time() - 60
    os.utime(registry.name_dir("x") / "versions", (old, old))
    run(rec.reconcile_once())
    assert run(rec.ensure("x@v0002")) is None  # not published yet: the list is cached
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    assert run(rec.ensure("x@v0002")) is None
    assert "x@v0002" in transport.table
    assert run(rec.ensure("x@v0009")) is None and "x@v0009" not in transport.table
