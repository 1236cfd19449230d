"""Scenario: the reconcile loop under faults (issue 10), with the fake transport: no vLLM,
no torch. Each test names the finding it covers; each failed on the code before the fix.
The same faults against a real vLLM: test_scenario_faults_live.py."""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import LIMITS, FakeTransport, make_reconciler, run, serves, status_of
from helpers import fake_adapter, set_current, write_version
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_finetune.errors import ServerUnavailableError
from agent_finetune.registry import Registry
from agent_finetune.registry.store import MARKER
from server_plugin import metrics
from server_plugin.cache import AdapterCache
from server_plugin.reconciler import Reconciler
from server_plugin.settings import Settings


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
    registry, transport, rec = make_reconciler(tmp_path)
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


def test_permanent_failure_is_remembered_until_current_moves(tmp_path: Path) -> None:
    """Finding: promoting a failed version again did not retry it."""
    registry, transport, rec = make_reconciler(tmp_path)
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
    registry, _transport, rec = make_reconciler(tmp_path)
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
    registry, _, rec = make_reconciler(tmp_path)
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
    registry, transport, rec = make_reconciler(tmp_path, unload_after=2)
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
    registry, transport, rec = make_reconciler(tmp_path, unload_after=3, max_removals=2)
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
    registry, transport, rec = make_reconciler(tmp_path)
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
    registry, transport, rec = make_reconciler(tmp_path)
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
    registry, transport, rec = make_reconciler(tmp_path)
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
    registry, transport, rec = make_reconciler(tmp_path)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    assert run(rec.ensure("x@v0002")) is None
    first = transport.table["x@v0002"]
    shutil.rmtree(registry.version_dir("x", "v0002"))
    write_version(registry, "x", fake_adapter(tmp_path / "a3", seed=3), make_current=False)
    run(rec.reconcile_once())
    assert run(rec.ensure("x@v0002")) is None
    assert transport.table["x@v0002"] != first


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
    rec = Reconciler(registry, cache, transport, Settings(max_pinned=1, unload_after=1))
    registry.publish("x", fake_adapter(tmp / "seed", seed=99))
    for op, arg in ops:
        versions = registry.versions("x") if registry.name_dir("x").is_dir() else []
        if op == "publish":
            registry.publish("x", fake_adapter(tmp / f"p{len(versions)}", seed=arg))
        elif op == "promote" and f"v{arg:04d}" in versions:
            set_current(registry, "x", f"v{arg:04d}")
        elif op == "pin":
            run(rec.ensure(f"x@v{arg:04d}"))
        elif op == "pass":
            run(rec.reconcile_once())
        elif op == "restart":
            transport.table.clear()
        elif op == "delete" and f"v{arg:04d}" in versions:
            shutil.rmtree(registry.version_dir("x", f"v{arg:04d}"))
        run(rec.reconcile_once())
        for path in transport.table.values():
            assert Path(path, "adapter_model.safetensors").is_file(), (op, arg, path)
