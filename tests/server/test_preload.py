"""Lazy loading (AGENT_FINETUNE_PRELOAD) with the fake transport: no vLLM, no torch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fakes import LIMITS, FakeTransport
from helpers import fake_adapter
from hypothesis import given
from hypothesis import strategies as st

from agent_finetune.registry import Registry
from agent_finetune.registry.names import NAME_RE
from server_plugin.cache import AdapterCache
from server_plugin.launch import build_command
from server_plugin.middleware import ModelRequestMiddleware
from server_plugin.preload import LAZY_MAX_CPU_LORAS, PreloadPolicy, Usage
from server_plugin.reconciler import PinRefusal, Reconciler


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


def make(
    tmp: Path, n_names: int, *, preload: str = "none", engine_bound: int = 64, **kw: Any
) -> tuple[Registry, SlowTransport, Reconciler]:
    registry = Registry(tmp / "registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    source = fake_adapter(tmp / "adapter", seed=1)
    for i in range(n_names):
        registry.publish(f"n{i:02d}", source)
    transport = SlowTransport()
    rec = Reconciler(
        registry,
        AdapterCache(tmp / "cache", LIMITS, grace_s=0),
        transport,
        max_pinned=kw.pop("max_pinned", 0),
        preload=PreloadPolicy.parse(preload),
        engine_bound=engine_bound,
        **kw,
    )
    return registry, transport, rec


def states(rec: Reconciler) -> dict[str, str]:
    return {a["name"]: a["state"] for a in rec.status()["data"]}


def copies(rec: Reconciler) -> list[Path]:
    return sorted(p for p in rec.cache.root.rglob("v0*") if p.is_dir())


def test_lazy_start_reads_metadata_only(tmp_path: Path) -> None:
    _, transport, rec = make(tmp_path, 12)
    asyncio.run(rec.reconcile_once())
    assert transport.calls == []  # nothing loaded
    assert copies(rec) == []  # nothing copied
    assert set(states(rec).values()) == {"lazy"}
    assert rec.lazy_names() == [f"n{i:02d}" for i in range(12)]  # /v1/models lists them
    assert rec.status()["preload"]["policy"] == "none"


def test_first_request_loads_the_name_which_then_follows_current(tmp_path: Path) -> None:
    registry, transport, rec = make(tmp_path, 3)

    async def scenario() -> None:
        await rec.reconcile_once()
        assert await rec.ensure_name("n01") is None
        assert transport.table["n01"] == transport.table["n01@v0001"]
        assert states(rec)["n01"] == "live" and states(rec)["n00"] == "lazy"
        assert await rec.ensure_name("n01") is None  # served now: a hit, no load
        assert transport.loads() == ["n01@v0001"]
        assert await rec.ensure_name("nobody") is None  # not ours: vLLM answers 404
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
    _, transport, rec = make(tmp_path, 6, max_loads=2)

    async def scenario() -> list[PinRefusal | None]:
        await rec.reconcile_once()
        same = [rec.ensure_name("n00") for _ in range(16)]
        others = [rec.ensure_name(f"n{i:02d}") for i in range(1, 6) for _ in range(3)]
        return list(await asyncio.gather(*same, *others))

    results = asyncio.run(scenario())
    assert results == [None] * 31
    assert transport.loads().count("n00@v0001") == 1
    assert sorted(transport.loads()) == [f"n{i:02d}@v0001" for i in range(6)]
    assert transport.most_in_flight == 2  # AGENT_FINETUNE_MAX_LOADS


def test_loaded_lazy_names_and_their_copies_stay_bounded(tmp_path: Path) -> None:
    _, transport, rec = make(tmp_path, 14, engine_bound=4, max_loads=1)

    async def scenario() -> None:
        await rec.reconcile_once()
        for rnd in range(2):
            for i in range(14):
                assert await rec.ensure_name(f"n{i:02d}") is None
                assert f"n{i:02d}" in transport.table  # served when its request goes on
                public = [n for n in transport.table if "@" not in n]
                assert len(public) <= rec.lazy_capacity == 4
                await rec.reconcile_once()  # deletes released copies (grace 0)
                assert len(copies(rec)) <= 4, (rnd, i)

    asyncio.run(scenario())
    assert len(transport.loads()) == 28  # evicted names load again on their next request
    assert sum(s == "lazy" for s in states(rec).values()) == 10


def test_a_refused_lazy_name_is_refused_without_reloading(tmp_path: Path) -> None:
    registry, transport, rec = make(tmp_path, 1)
    bad = fake_adapter(tmp_path / "bad", seed=3, r=32)  # above the server's rank 16
    from helpers import write_version

    write_version(registry, "n00", bad)

    async def scenario() -> tuple[PinRefusal | None, PinRefusal | None]:
        await rec.reconcile_once()
        return await rec.ensure_name("n00"), await rec.ensure_name("n00")

    first, second = asyncio.run(scenario())
    assert first is not None and first.status == 400 and "rank" in first.message
    assert second == first
    assert transport.loads() == []  # refused by validation, once; never handed to vLLM
    assert states(rec)["n00"] == "failed"


def test_auto_preloads_all_while_names_fit_then_the_most_recent(tmp_path: Path) -> None:
    _, _, rec = make(tmp_path, 6, preload="auto", engine_bound=10, max_pinned=4)
    asyncio.run(rec.reconcile_once())
    assert str(rec.policy) == "all" and not rec.lazy
    assert set(states(rec).values()) == {"live"}

    usage = Usage(tmp_path / "usage.json")
    usage.used_at = {"n04": 200.0, "n01": 100.0}
    _, _, rec = make(
        tmp_path / "more", 9, preload="auto", engine_bound=7, max_pinned=4, usage=usage
    )
    asyncio.run(rec.reconcile_once())
    # 9 names do not fit 7 - 4 = 3: recent:3 = the two used ones, then the newest pointer.
    assert str(rec.policy) == "recent:3"
    assert sorted(n for n, s in states(rec).items() if s == "live") == ["n01", "n04", "n08"]


def test_usage_record_survives_a_restart_and_merges(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    a, b = Usage(path), Usage(path)
    a.touch("x")
    a.save(force=True)
    b.touch("y")
    b.save(force=True)
    assert set(Usage(path).used_at) == {"x", "y"}
    path.write_text("not json")
    assert Usage(path).used_at == {}


@given(
    st.one_of(
        st.sampled_from(["all", "none", "auto"]),
        st.integers(0, 10_000).map(lambda n: f"recent:{n}"),
        st.lists(st.from_regex(NAME_RE, fullmatch=True), min_size=1, max_size=4).map(",".join),
    )
)
def test_policy_round_trips(value: str) -> None:
    assert str(PreloadPolicy.parse(value)) == value


@pytest.mark.parametrize("bad", ["recent:", "recent:-1", "recent:x", "Bad Name", ",", "a,B"])
def test_bad_policy_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"AGENT_FINETUNE_PRELOAD=.*expected"):
        PreloadPolicy.parse(bad)


def test_max_cpu_loras_default_is_bounded_unless_everything_is_preloaded(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    for i in range(200):  # names() needs only the folders
        (root / f"n{i:03d}" / "versions").mkdir(parents=True)

    def cpu_loras(**kw: Any) -> int:
        cmd = build_command("m", root, **kw)
        return int(cmd[cmd.index("--max-cpu-loras") + 1])

    assert cpu_loras() == LAZY_MAX_CPU_LORAS  # auto: 200 names do not fit
    assert cpu_loras(preload="none") == LAZY_MAX_CPU_LORAS
    assert cpu_loras(preload="all") == 204  # every name + 4 pinned, as asked
    assert cpu_loras(preload="recent:100") == 100 + 4 + 8
    assert cpu_loras(max_cpu_loras=9) == 9
    assert cpu_loras(extra_args=["--max-cpu-loras", "5"]) == 5


def test_middleware_loads_a_lazy_name_before_the_app_sees_the_request(tmp_path: Path) -> None:
    _, transport, rec = make(tmp_path, 2)
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


def test_copies_in_use_can_be_read_from_the_cache_thread_during_loads(tmp_path: Path) -> None:
    """The cache asks ``in_use`` from its worker thread (a bounded copy making room) while
    lazy loads on the event loop change what is loaded: that read must not fail."""
    import sys
    import threading

    _, _, rec = make(tmp_path, 1)
    rec._actual = {f"n{i}": f"/c/{i}" for i in range(5000)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                rec.cache.in_use()
            except RuntimeError as e:  # "dictionary changed size during iteration"
                errors.append(e)
                return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(200):  # loads and unloads, as lazy names come and go
            for i in range(500):
                rec._actual[f"x{i}"] = "/c/x"
            for i in range(500):
                del rec._actual[f"x{i}"]
            if errors:
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    assert errors == []


def test_a_copy_claimed_again_is_not_deleted_by_a_deletion_decided_before(
    tmp_path: Path,
) -> None:
    """Run 1 of bench/scale.py: a lazy name reloaded while another load made room got its
    copy deleted between ``prepare`` and vLLM's load (vLLM 404, remembered as a refusal)."""
    registry, _, rec = make(tmp_path, 1)
    cache = rec.cache
    path, _ = cache.prepare(registry, "n00", "v0001")
    cache.release(path)
    chosen = list(cache._released)  # make_room()/collect() in another thread picked it ...
    again, _ = cache.prepare(registry, "n00", "v0001")  # ... while a load claimed it again
    assert again == path
    for p in chosen:
        cache.delete_if_released(p)
    assert path.is_dir()  # still there for vLLM to load


def test_a_request_arriving_while_its_name_loads_waits_for_that_load(tmp_path: Path) -> None:
    """Run 2 of bench/scale.py: a second request for a name whose load had started passed
    straight through (the name was no longer lazy, not yet served) and vLLM answered 404."""
    _, transport, rec = make(tmp_path, 1)

    async def scenario() -> bool:
        await rec.reconcile_once()
        first = asyncio.ensure_future(rec.ensure_name("n00"))
        while transport.in_flight == 0:  # the first request's load has reached vLLM
            await asyncio.sleep(0.001)
        assert await rec.ensure_name("n00") is None
        served = "n00" in transport.table  # what vLLM would find for the second request
        await first
        return served

    assert asyncio.run(scenario())
    assert transport.loads() == ["n00@v0001"]
