"""The reconcile loop under faults (issue 10), with the fake transport: no vLLM, no torch.

Each test names the finding it covers; each failed on the code before the fix.
"""

from __future__ import annotations

import asyncio
import errno
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import LIMITS, FakeTransport
from helpers import fake_adapter, set_current, write_version
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_finetune.errors import ServerUnavailableError
from agent_finetune.registry import Registry
from agent_finetune.registry.store import MARKER
from server_plugin import metrics
from server_plugin.cache import AdapterCache
from server_plugin.reconciler import Reconciler


def make(tmp: Path, **options: Any) -> tuple[Registry, FakeTransport, Reconciler]:
    registry = Registry(tmp / "registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    transport = FakeTransport()
    cache = AdapterCache(tmp / "cache", LIMITS, grace_s=options.pop("grace_s", 0.0))
    options = {"max_pinned": 2, "retry_base_s": 0.01, "retry_max_s": 0.02, **options}
    return registry, transport, Reconciler(registry, cache, transport, **options)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def status_of(rec: Reconciler, name: str) -> dict[str, Any]:
    return next(a for a in rec.status()["data"] if a["name"] == name)


def serves(transport: FakeTransport, name: str, version: str) -> bool:
    return name in transport.table and transport.table[name] == transport.table.get(
        f"{name}@{version}"
    )


# -- transient failures are retried; permanent ones remembered until current moves --------
@pytest.mark.parametrize(
    "fault",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EIO, "Input/output error"),
        ServerUnavailableError("vLLM: HTTP 500 InternalServerError: engine busy"),
        TimeoutError("load timed out"),
    ],
    ids=["disk-full", "eio", "5xx", "timeout"],
)
def test_transient_failure_is_retried_with_backoff(tmp_path: Path, fault: Exception) -> None:
    """Finding: one transient error stuck forever (stored in _failed, never retried)."""
    registry, transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    run(rec.reconcile_once())
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2))
    transport.faults = [fault, fault]
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert (st["state"], st["live"], st["desired"]) == ("retrying", "v0001", "v0002")
    assert st["error_kind"] == "transient" and st["attempts"] == 1 and st["next_retry"]
    time.sleep(0.05)  # past the (tiny) backoff
    run(rec.reconcile_once())
    assert status_of(rec, "x")["attempts"] == 2
    time.sleep(0.05)
    run(rec.reconcile_once())  # the fault is gone: this attempt succeeds
    st = status_of(rec, "x")
    assert (st["state"], st["live"], st["error"]) == ("live", "v0002", None)
    assert serves(transport, "x", "v0002")


def test_backoff_is_capped_exponential_with_jitter(tmp_path: Path) -> None:
    _, _, rec = make(tmp_path, retry_base_s=1.0, retry_max_s=8.0, rng=random.Random(0))
    delays = []
    previous = None
    for _ in range(7):
        before = time.monotonic()
        previous = rec._record_failure(("x", "v0001", "k"), OSError("eio"), previous)
        delays.append(previous.next_try - before)
    caps = [1, 2, 4, 8, 8, 8, 8]
    assert all(c / 2 - 0.01 <= d <= c + 0.01 for d, c in zip(delays, caps, strict=True)), delays
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jitter: capped delays differ


def test_permanent_failure_is_remembered_until_current_moves(tmp_path: Path) -> None:
    """Finding: promoting a failed version again did not retry it."""
    registry, transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    run(rec.reconcile_once())
    bad = write_version(registry, "x", fake_adapter(tmp_path / "bad", seed=2, r=32))
    run(rec.reconcile_once())
    assert status_of(rec, "x")["error_kind"] == "permanent"
    n_loads = len(transport.loads())
    run(rec.reconcile_once())
    assert len(transport.loads()) == n_loads  # remembered: not copied, validated or loaded
    set_current(registry, "x", "v0001")
    run(rec.reconcile_once())
    assert status_of(rec, "x")["state"] == "live"
    # Fix the version in place (same number, new manifest): promoting it again retries it.
    vdir = registry.version_dir("x", bad)
    shutil.rmtree(vdir)
    write_version(registry, "x", fake_adapter(tmp_path / "fixed", seed=3), make_current=False)
    set_current(registry, "x", bad)
    run(rec.reconcile_once())
    assert status_of(rec, "x")["live"] == bad and serves(transport, "x", bad)


def test_status_is_rewritten_on_every_pass(tmp_path: Path) -> None:
    """Finding: when a pass skipped a failed version, status kept saying `live`."""
    registry, _transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    write_version(registry, "x", fake_adapter(tmp_path / "bad", seed=2, r=32))  # v0002
    run(rec.reconcile_once())
    registry.publish("x", fake_adapter(tmp_path / "a3", seed=3))  # v0003, good
    run(rec.reconcile_once())
    assert status_of(rec, "x")["state"] == "live"
    set_current(registry, "x", "v0002")  # back to the rejected one
    run(rec.reconcile_once())
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert (st["state"], st["desired"], st["live"]) == ("failed", "v0002", "v0003")
    assert st["error_version"] == "v0002"


def test_old_versions_error_is_cleared_once_a_newer_one_is_live(tmp_path: Path) -> None:
    registry, _, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    write_version(registry, "x", fake_adapter(tmp_path / "bad", seed=2, r=32))
    run(rec.reconcile_once())
    assert status_of(rec, "x")["error_version"] == "v0002"
    registry.publish("x", fake_adapter(tmp_path / "a3", seed=3))
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert (st["state"], st["live"], st["error"], st["error_version"]) == (
        "live",
        "v0003",
        None,
        None,
    )


# -- a vanished registry unloads nothing -----------------------------------------------------
@pytest.mark.parametrize("vanish", ["empty", "no-marker", "unreadable"])
def test_vanished_registry_unloads_nothing(tmp_path: Path, vanish: str) -> None:
    """Finding: an empty registry root (unmounted NFS, recreated folder) unloaded everything."""
    registry, transport, rec = make(tmp_path, unload_after=2)
    for i in range(3):
        registry.publish(f"n{i}", fake_adapter(tmp_path / f"a{i}", seed=i))
    run(rec.reconcile_once())
    served = dict(transport.table)
    registry.root.rename(tmp_path / "away")
    registry.root.mkdir()
    if vanish == "no-marker":  # a foreign folder with registry-like content but no marker
        shutil.copytree(tmp_path / "away" / "n0", registry.root / "n0")
    elif vanish == "unreadable":
        registry.root.rmdir()
        registry.root.write_text("not a folder")
    for _ in range(5):
        run(rec.reconcile_once())
    assert transport.table == served
    assert rec.status()["registry_available"] is False
    assert "unloading nothing" in rec.status()["sync_error"]
    assert metrics.REGISTRY_AVAILABLE._value.get() == 0
    assert {a["state"] for a in rec.status()["data"]} == {"live"}
    if registry.root.is_dir():
        shutil.rmtree(registry.root)
    else:
        registry.root.unlink()
    (tmp_path / "away").rename(registry.root)
    run(rec.reconcile_once())
    assert rec.status()["registry_available"] is True and rec.status()["sync_error"] is None
    assert transport.table == served


def test_names_unload_only_after_n_absent_passes_and_capped_per_pass(tmp_path: Path) -> None:
    registry, transport, rec = make(tmp_path, unload_after=3, max_removals=2)
    for i in range(5):
        registry.publish(f"n{i}", fake_adapter(tmp_path / f"a{i}", seed=i))
    registry.publish("keep", fake_adapter(tmp_path / "k", seed=9))
    run(rec.reconcile_once())
    for i in range(5):
        shutil.rmtree(registry.name_dir(f"n{i}"))
    remaining = []
    for _ in range(6):
        run(rec.reconcile_once())
        remaining.append(sum(f"n{i}" in transport.table for i in range(5)))
    assert remaining == [5, 5, 3, 1, 0, 0]
    assert "keep" in transport.table
    # A name that comes back within the window is never unloaded.
    registry.publish("back", fake_adapter(tmp_path / "b", seed=7))
    run(rec.reconcile_once())
    moved = tmp_path / "back-away"
    registry.name_dir("back").rename(moved)
    run(rec.reconcile_once())
    moved.rename(registry.name_dir("back"))
    for _ in range(4):
        run(rec.reconcile_once())
    assert "back" in transport.table and status_of(rec, "back")["absent_passes"] == 0


def test_marker_is_written_by_the_first_write(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    assert not registry.is_marked()
    registry.publish("x", fake_adapter(tmp_path / "a", seed=1))
    assert registry.is_marked() and (registry.root / MARKER).is_file()
    assert registry.names() == ["x"]


# -- compare with reality ------------------------------------------------------------------
def test_lost_loads_are_reloaded_and_status_follows_the_server(tmp_path: Path) -> None:
    """Finding: a restarted server served nothing while status said live."""
    registry, transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("y", fake_adapter(tmp_path / "a2", seed=2))
    run(rec.reconcile_once())
    transport.table.clear()  # the server restarted
    transport.faults = [ServerUnavailableError("engine starting")] * 2
    run(rec.reconcile_once())
    assert {a["live"] for a in rec.status()["data"]} == {None}  # truthful while down
    time.sleep(0.05)
    run(rec.reconcile_once())
    assert serves(transport, "x", "v0001") and serves(transport, "y", "v0001")
    assert {(a["state"], a["live"]) for a in rec.status()["data"]} == {("live", "v0001")}


def test_server_unreachable_is_reported_not_raised(tmp_path: Path) -> None:
    registry, transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    run(rec.reconcile_once())

    async def down() -> dict[str, str]:
        raise ServerUnavailableError("connection refused")

    transport.served = down  # type: ignore[method-assign]
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert st["live"] is None and st["state"] == "retrying"
    assert "connection refused" in rec.status()["server_error"]


# -- content-keyed loads ---------------------------------------------------------------------
def test_reused_version_number_serves_the_new_content(tmp_path: Path) -> None:
    """Finding: loads keyed by name@vNNNN kept serving stale weights after a number reuse."""
    registry, transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    run(rec.reconcile_once())
    old = Path(transport.table["x"])
    shutil.rmtree(registry.name_dir("x") / "versions" / "v0001")
    write_version(registry, "x", fake_adapter(tmp_path / "a2", seed=2))  # v0001 again
    run(rec.reconcile_once())
    new = Path(transport.table["x"])
    assert new != old
    want = (registry.version_dir("x", "v0001") / "adapter_model.safetensors").read_bytes()
    assert (new / "adapter_model.safetensors").read_bytes() == want
    assert transport.table["x@v0001"] == str(new)  # the pinned name follows the content
    st = status_of(rec, "x")
    assert st["live"] == "v0001" and st["state"] == "live" and st["sha256"] in new.name


def test_changed_pinned_version_is_reloaded(tmp_path: Path) -> None:
    registry, transport, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    assert run(rec.ensure_pinned("x@v0002")) is None
    first = transport.table["x@v0002"]
    shutil.rmtree(registry.version_dir("x", "v0002"))
    write_version(registry, "x", fake_adapter(tmp_path / "a3", seed=3), make_current=False)
    run(rec.reconcile_once())
    assert run(rec.ensure_pinned("x@v0002")) is None
    assert transport.table["x@v0002"] != first


# -- pins ----------------------------------------------------------------------------------
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


def test_unknown_pins_do_not_queue_behind_a_swap(tmp_path: Path) -> None:
    """Finding: existence checks of pins ran under the global lock, behind real swaps."""
    registry, _, _ = make(tmp_path)
    transport = BlockingTransport()
    rec = Reconciler(registry, AdapterCache(tmp_path / "c2", LIMITS), transport, max_pinned=2)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))

    async def scenario() -> None:
        swap = asyncio.create_task(rec.reconcile_once())
        while transport.running == 0:  # the swap is now inside its load
            await asyncio.sleep(0.01)
        # Would wait forever behind the blocked swap if it took the swap's lock.
        for _ in range(50):
            assert await asyncio.wait_for(rec.ensure_pinned("x@v0099"), 30) is None
        transport.gate.set()
        await swap

    run(scenario())


def test_unknown_pins_are_negatively_cached(tmp_path: Path, monkeypatch: Any) -> None:
    registry, _, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    run(rec.reconcile_once())
    checks = []
    real = rec._pin_facts
    monkeypatch.setattr(rec, "_pin_facts", lambda n, v: checks.append(v) or real(n, v))
    rec.resync_s = 3600.0
    for _ in range(20):
        assert run(rec.ensure_pinned("x@v0099")) is None
    assert len(checks) == 1
    run(rec.reconcile_once())  # a pass (a registry event) forgets: maybe it was published
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    assert run(rec.ensure_pinned("x@v0002")) is None and rec.is_loaded("x@v0002")


def test_rejected_pins_are_remembered(tmp_path: Path, monkeypatch: Any) -> None:
    """Finding: a rejected pin was copied, hashed and validated again on every request."""
    registry, _, rec = make(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    write_version(registry, "x", fake_adapter(tmp_path / "bad", seed=2, r=32), make_current=False)
    run(rec.reconcile_once())
    prepares = []
    real = rec.cache.prepare
    monkeypatch.setattr(rec.cache, "prepare", lambda *a, **k: prepares.append(a) or real(*a, **k))
    for _ in range(10):
        refusal = run(rec.ensure_pinned("x@v0002"))
        assert refusal is not None and refusal.status == 400 and "max-lora-rank" in refusal.message
    assert len(prepares) == 1


def test_concurrent_pins_share_one_load_and_loads_are_bounded(tmp_path: Path) -> None:
    registry, _, _ = make(tmp_path)
    transport = BlockingTransport()
    rec = Reconciler(
        registry, AdapterCache(tmp_path / "c2", LIMITS), transport, max_pinned=8, max_loads=2
    )
    for seed in range(6):
        registry.publish("x", fake_adapter(tmp_path / f"a{seed}", seed=seed), make_current=False)

    async def scenario() -> None:
        same = [asyncio.create_task(rec.ensure_pinned("x@v0001")) for _ in range(5)]
        others = [asyncio.create_task(rec.ensure_pinned(f"x@v000{i}")) for i in range(2, 7)]
        await asyncio.sleep(0.2)
        transport.gate.set()
        assert await asyncio.gather(*same, *others) == [None] * 10

    run(scenario())
    assert transport.loads().count("x@v0001") == 1
    assert transport.peak <= 2


def test_pins_of_never_current_versions_can_be_refused(tmp_path: Path) -> None:
    registry, _, rec = make(tmp_path, pins="current")
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2))
    registry.publish("x", fake_adapter(tmp_path / "a3", seed=3), make_current=False)
    run(rec.reconcile_once())
    assert run(rec.ensure_pinned("x@v0001")) is None  # was current once
    refusal = run(rec.ensure_pinned("x@v0003"))
    assert refusal is not None and "AGENT_FINETUNE_PINS" in refusal.message
    _, _, rec_any = make(tmp_path / "any")
    rec_any.registry = registry
    assert run(rec_any.ensure_pinned("x@v0003")) is None  # the default allows it


# -- the cache never deletes what the server may re-read --------------------------------------
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
    transport = FakeTransport()
    cache = AdapterCache(tmp_path / "cache", LIMITS, max_bytes=5 * size, grace_s=3600)
    rec = Reconciler(registry, cache, transport, max_pinned=2)
    run(rec.reconcile_once())
    refusals = [run(rec.ensure_pinned(f"x@v{n:04d}")) for n in range(2, 13)]
    assert cache.bytes <= 5 * size
    assert any(r is not None and r.status == 503 and "MAX_BYTES" in r.message for r in refusals)
    for path in transport.table.values():
        assert Path(path, "adapter_model.safetensors").is_file()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 2)),
        st.tuples(st.just("promote"), st.integers(1, 6)),
        st.tuples(st.just("pin"), st.integers(1, 6)),
        st.tuples(st.just("pass"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
        st.tuples(st.just("delete"), st.integers(1, 6)),
    ),
    max_size=25,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_cache_never_deletes_a_copy_the_server_serves(
    tmp_path_factory: Any, ops: list[Any]
) -> None:
    """Property: whatever happens, every path the server serves exists (vLLM re-reads it
    after evicting it from its CPU cache and dies on a missing path)."""
    tmp = tmp_path_factory.mktemp("prop")
    registry = Registry(tmp / "registry")
    transport = FakeTransport()
    cache = AdapterCache(tmp / "cache", LIMITS, max_bytes=20_000, grace_s=0.0)
    rec = Reconciler(registry, cache, transport, max_pinned=1, unload_after=1)
    registry.publish("x", fake_adapter(tmp / "seed", seed=99))
    for op, arg in ops:
        versions = registry.versions("x") if registry.name_dir("x").is_dir() else []
        if op == "publish":
            registry.publish("x", fake_adapter(tmp / f"p{len(versions)}", seed=arg))
        elif op == "promote" and f"v{arg:04d}" in versions:
            set_current(registry, "x", f"v{arg:04d}")
        elif op == "pin":
            run(rec.ensure_pinned(f"x@v{arg:04d}"))
        elif op == "pass":
            run(rec.reconcile_once())
        elif op == "restart":
            transport.table.clear()
        elif op == "delete" and f"v{arg:04d}" in versions:
            shutil.rmtree(registry.version_dir("x", f"v{arg:04d}"))
        run(rec.reconcile_once())
        for path in transport.table.values():
            assert Path(path, "adapter_model.safetensors").is_file(), (op, arg, path)
