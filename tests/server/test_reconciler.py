"""The reconcile loop (``server_plugin.reconciler``) with a fake transport: no vLLM, no torch.
The loop under injected faults: test_scenario_faults.py."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from fakes import LIMITS, FakeTransport, make_reconciler, run, status_of
from helpers import FAKE_BASE_CONFIG, edit_config, fake_adapter, set_current, write_version

from agent_finetune.registry import Registry, index
from server_plugin.cache import AdapterCache
from server_plugin.reconciler import Reconciler
from server_plugin.settings import Settings


@pytest.fixture
def env(tmp_path: Path) -> tuple[Registry, FakeTransport, Reconciler, Path]:
    registry, transport, rec = make_reconciler(tmp_path)
    return registry, transport, rec, tmp_path


def test_publish_swap_rollback_and_pin(env: Any) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    run(rec.reconcile_once())
    assert transport.table["x"] == transport.table["x@v0001"]
    assert status_of(rec, "x")["state"] == "live"
    assert status_of(rec, "x")["live"] == "v0001"

    registry.publish("x", fake_adapter(tmp / "a2", seed=2))
    run(rec.reconcile_once())
    assert transport.table["x"] == transport.table["x@v0002"] != transport.table["x@v0001"]
    assert rec.status()["pinned"][0]["model"] == "x@v0001"  # kept for a fast rollback

    registry.rollback("x")
    n_loads = len(transport.loads())
    run(rec.reconcile_once())
    assert transport.table["x"] == transport.table["x@v0001"]
    assert len(transport.loads()) == n_loads  # a rollback to a kept version is a repoint
    assert transport.calls[-1] == ("repoint", "x", "x@v0001")

    run(rec.reconcile_once())  # idempotent: nothing to do
    assert transport.calls[-1] == ("repoint", "x", "x@v0001")


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("rank", "exceeds the server's --max-lora-rank"),
        ("checksum", "sha256 does not match"),
        ("truncated", "truncated"),
        ("modules_to_save", "modules_to_save"),
        ("dora", "DoRA"),
        ("base_name", "does not match the served model"),
        ("shapes", "does not fit the base model"),
        ("refused", "vLLM refused"),
    ],
)
def test_bad_version_keeps_the_live_one(env: Any, kind: str, cause: str) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "good", seed=1))
    run(rec.reconcile_once())
    bad = fake_adapter(tmp / "bad", seed=2, r=32 if kind == "rank" else 8)
    if kind == "modules_to_save":
        edit_config(bad, modules_to_save=["lm_head"])
    elif kind == "dora":
        edit_config(bad, use_dora=True)
    elif kind == "base_name":
        edit_config(bad, base_model_name_or_path="someone/other-model")
    elif kind == "shapes":
        fake_adapter(bad, seed=2, base_config={**FAKE_BASE_CONFIG, "hidden_size": 96})
    elif kind == "truncated":
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "refused":
        transport.refuse.add("x@v0002")
    version = write_version(registry, "x", bad)
    if kind == "checksum":
        weights = registry.version_dir("x", version) / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert (st["state"], st["live"], st["desired"]) == ("failed", "v0001", "v0002")
    assert cause in st["error"], st["error"]
    assert transport.table["x"] == transport.table["x@v0001"]
    n_calls = len(transport.calls)
    run(rec.reconcile_once())  # not retried until the version's manifest changes
    assert len(transport.calls) == n_calls
    assert "x@v0002" not in transport.table


def test_registry_deletions_never_touch_live_weights(env: Any) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    registry.publish("y", fake_adapter(tmp / "a2", seed=2))
    run(rec.reconcile_once())
    served = Path(transport.table["x"])
    before = (served / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(registry.version_dir("x", "v0001"))  # rm -rf of the live version
    run(rec.reconcile_once())
    assert status_of(rec, "x")["state"] == "live"
    assert (served / "adapter_model.safetensors").read_bytes() == before

    shutil.rmtree(registry.name_dir("y"))  # the whole name leaves the registry
    for _ in range(rec.settings.unload_after - 1):
        run(rec.reconcile_once())
        assert "y" in transport.table  # absence is not deletion until it lasts
        assert status_of(rec, "y")["absent_passes"] >= 1
    run(rec.reconcile_once())
    assert "y" not in transport.table and "y@v0001" not in transport.table
    assert [a["name"] for a in rec.status()["data"]] == ["x"]
    assert "x" in transport.table


def test_missing_registry_keeps_everything(env: Any) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    run(rec.reconcile_once())
    registry.root.rename(tmp / "moved-away")
    run(rec.reconcile_once())
    assert "unreadable" in rec.status()["sync_error"]
    assert "x" in transport.table


def test_unreadable_pointer_keeps_live_version(env: Any) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    run(rec.reconcile_once())
    (registry.name_dir("x") / "current").write_text("{not json")
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert st["live"] == "v0001" and "current" in st["error"]
    assert "x" in transport.table


def test_cache_copies_outlive_their_names_by_the_grace_period(env: Any) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    run(rec.reconcile_once())
    first = Path(transport.table["x@v0001"])
    for seed in (2, 3, 4):  # v0001 falls out of the LRU of 2
        registry.publish("x", fake_adapter(tmp / f"a{seed}", seed=seed))
        run(rec.reconcile_once())
    run(rec.reconcile_once())
    assert "x@v0001" not in transport.table
    assert not first.exists()  # grace 0 in this fixture
    assert Path(transport.table["x"]).exists()


def test_failed_version_retried_when_its_manifest_changes(env: Any) -> None:
    registry, _transport, rec, tmp = env
    bad = fake_adapter(tmp / "bad", seed=1, r=32)
    version = write_version(registry, "x", bad)
    run(rec.reconcile_once())
    assert status_of(rec, "x")["state"] == "failed"
    good = fake_adapter(tmp / "good", seed=1)
    vdir = registry.version_dir("x", version)
    shutil.rmtree(vdir)
    write_version(registry, "x", good, make_current=False)  # becomes v0001 again
    set_current(registry, "x", "v0001")
    run(rec.reconcile_once())
    assert status_of(rec, "x")["state"] == "live"


def test_run_loop_wakes_and_stops(env: Any) -> None:
    registry, transport, _, tmp = env
    # Only a wake-up can make the second pass happen in time.
    rec = Reconciler(registry, AdapterCache(tmp / "c2", LIMITS), transport, Settings(resync_s=30))

    async def scenario() -> None:
        task = asyncio.create_task(rec.run())
        while rec.passes < 1:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(registry.publish, "x", fake_adapter(tmp / "a1", seed=1))
        rec.wake()
        while "x" not in transport.table:
            await asyncio.sleep(0.01)
        rec.stop()
        await asyncio.wait_for(task, 10)

    run(scenario())


def test_pointer_to_a_missing_version_keeps_the_live_one(env: Any) -> None:
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    run(rec.reconcile_once())
    set_current(registry, "x", "v0007")
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert (st["state"], st["live"], st["desired"]) == ("failed", "v0001", "v0007")
    assert "x@v0007 not found" in st["error"]
    assert transport.table["x"] == transport.table["x@v0001"]


def test_an_unreadable_name_is_kept_as_it_is(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (issue 25): a transient EIO/ESTALE/EACCES on one name's `versions/` made the
    pass skip the name, so after `unload_after` passes it was unloaded like a deleted one."""
    registry, transport, rec, tmp = env
    registry.publish("x", fake_adapter(tmp / "a1", seed=1))
    registry.publish("y", fake_adapter(tmp / "a2", seed=2))
    run(rec.reconcile_once())
    served = dict(transport.table)
    real, broken = os.stat, str(registry.name_dir("x") / "versions")

    def flaky_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path) == broken:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(index.os, "stat", flaky_stat)
    assert index.pointers(registry)["x"].error is not None  # unreadable, not absent
    for _ in range(rec.settings.unload_after + 2):
        run(rec.reconcile_once())
    assert transport.table == served
    st = status_of(rec, "x")
    assert (st["state"], st["live"], st["absent_passes"]) == ("live", "v0001", 0)
    assert "Input/output error" in st["error"] and st["error_kind"] == "transient"
    monkeypatch.setattr(index.os, "stat", real)
    registry.publish("x", fake_adapter(tmp / "a3", seed=3))
    run(rec.reconcile_once())
    assert status_of(rec, "x")["live"] == "v0002" and status_of(rec, "x")["error"] is None
