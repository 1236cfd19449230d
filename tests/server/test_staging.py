"""Versions staged ahead of going live (``server_plugin.staging``): promote and rollback are a
repoint, what status calls staged is loaded, and the choice is bounded and stable."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from fakes import FakeTransport, make_reconciler, run, serves, status_of
from helpers import fake_adapter, write_version
from hypothesis import HealthCheck, given, settings

from agent_finetune.errors import RegistryError
from agent_finetune.registry import Registry
from server_plugin.reconciler import Reconciler


def staged(rec: Reconciler, name: str) -> dict[str, str]:
    """version -> why, as ``/v1/adapters`` shows the name's staged versions."""
    return {
        e["version"]: e["why"] for e in status_of(rec, name)["staged"] if e["state"] == "staged"
    }


def loads_of(transport: FakeTransport, name: str) -> list[str]:
    return [s for s in transport.loads() if s.startswith(f"{name}@")]


def test_a_published_version_is_staged_and_its_promote_and_rollback_are_repoints(
    tmp_path: Path,
) -> None:
    registry, transport, rec = make_reconciler(tmp_path, max_staged=4)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    run(rec.reconcile_once())
    assert staged(rec, "x") == {}
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    assert staged(rec, "x") == {"v0002": "next"}
    assert transport.table["x@v0002"] != transport.table["x"]  # loaded, not routed
    n_loads = len(transport.loads())

    registry.promote("x", "v0002")
    run(rec.reconcile_once())
    assert serves(transport, "x", "v0002")
    assert len(transport.loads()) == n_loads  # the swap was a repoint
    st = status_of(rec, "x")
    assert st["swap_loaded"] is False and st["load_seconds"] is not None
    assert staged(rec, "x") == {"v0001": "rollback"}  # what a rollback returns to

    registry.rollback("x")
    run(rec.reconcile_once())
    assert serves(transport, "x", "v0001") and len(transport.loads()) == n_loads
    assert staged(rec, "x") == {"v0002": "next"}  # newest above current again
    top = rec.status()["staged"]
    assert [(e["model"], e["why"]) for e in top] == [("x@v0002", "next")]


def test_without_staging_a_promote_loads(tmp_path: Path) -> None:
    registry, transport, rec = make_reconciler(tmp_path, max_staged=0)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    assert "x@v0002" not in transport.table
    registry.promote("x", "v0002")
    run(rec.reconcile_once())
    assert status_of(rec, "x")["swap_loaded"] is True


def test_a_canary_candidate_comes_first_and_the_choice_is_bounded_and_stable(
    tmp_path: Path,
) -> None:
    registry, transport, rec = make_reconciler(tmp_path, max_staged=2)
    for name in ("a", "b"):
        registry.publish(name, fake_adapter(tmp_path / f"{name}1", seed=1))
        registry.publish(name, fake_adapter(tmp_path / f"{name}2", seed=2), make_current=False)
        registry.publish(name, fake_adapter(tmp_path / f"{name}3", seed=3), make_current=False)
    rec.stager.canaries = lambda: {"b": "v0002"}
    run(rec.reconcile_once())
    assert len(rec.status()["staged"]) == 1  # one load per pass: a promote never waits long
    run(rec.reconcile_once())
    # b's canary first; then the newest publish above current of the name published last
    assert staged(rec, "b") == {"v0002": "canary", "v0003": "next"}
    assert staged(rec, "a") == {} and len(rec.status()["staged"]) == 2
    loads = len(transport.loads())
    for _ in range(3):
        run(rec.reconcile_once())
    assert len(transport.loads()) == loads  # the same registry stages the same copies


def test_a_version_that_fails_to_stage_fails_its_promote_at_once(tmp_path: Path) -> None:
    registry, transport, rec = make_reconciler(tmp_path, max_staged=4)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    bad = fake_adapter(tmp_path / "bad", seed=2, r=32)  # above the server's max rank
    write_version(registry, "x", bad, make_current=False)
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert st["state"] == "live" and st["error"] is None  # the live version is untouched
    assert [(e["version"], e["state"]) for e in st["staged"]] == [("v0002", "failed")]
    assert "rank" in st["staged"][0]["error"]
    run(rec.reconcile_once())  # remembered: not tried again every pass
    assert registry.current("x") == "v0001"
    with registry.lock("x"):
        registry.set_current("x", "v0002", "promote", "test")
    run(rec.reconcile_once())
    st = status_of(rec, "x")
    assert st["state"] == "failed" and "rank" in st["error"]
    assert serves(transport, "x", "v0001")


def test_lazy_names_are_not_staged(tmp_path: Path) -> None:
    registry, transport, rec = make_reconciler(tmp_path, max_staged=4, preload="none")
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    assert transport.loads() == [] and status_of(rec, "x")["state"] == "lazy"
    assert run(rec.ensure("x")) is None  # its first request loads it: now it is served
    run(rec.reconcile_once())
    assert staged(rec, "x") == {"v0002": "next"}


def test_a_staged_copy_the_server_lost_is_not_reported_and_is_staged_again(
    tmp_path: Path,
) -> None:
    """Status never lies: staged means loaded in the server right now."""
    registry, transport, rec = make_reconciler(tmp_path, max_staged=4)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    del transport.table["x@v0002"]  # e.g. unloaded by hand
    assert staged(rec, "x") == {"v0002": "next"}  # not asked yet...
    run(rec.served.read_actual())
    rec._report(None)
    assert staged(rec, "x") == {}  # ...known lost: no longer shown
    run(rec.reconcile_once())
    assert staged(rec, "x") == {"v0002": "next"} and "x@v0002" in transport.table


def test_a_pass_visits_only_what_may_have_changed_and_yields(tmp_path: Path) -> None:
    """At 10,000 lazy names every pass visited every name on the event loop (84 ms of loop
    time, 133 ms stalls): it now visits the changed ones and the loaded ones."""
    registry, _, rec = make_reconciler(tmp_path, preload="none")
    src = fake_adapter(tmp_path / "a", seed=1)
    for i in range(30):
        registry.publish(f"n{i:02d}", src)
    run(rec.reconcile_once())
    visits: list[str] = []
    real = rec._reconcile_name

    async def spy(st: Any, pointer: Any, key: Any) -> None:
        visits.append(st.name)
        await real(st, pointer, key)

    rec._reconcile_name = spy  # type: ignore[method-assign]
    run(rec.reconcile_once())
    assert visits == []
    registry.publish("n07", src)
    run(rec.ensure("n03"))
    run(rec.reconcile_once())
    assert sorted(visits) == ["n03", "n07"]
    assert status_of(rec, "n07")["desired"] == "v0002"


# -- a property: whatever happens, what serves is current and what is called staged is loaded
OPS = st.lists(
    st.sampled_from(["publish", "publish-current", "promote", "rollback", "lose", "pass"]),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, seed=st.integers(0, 10_000), bound=st.integers(0, 3))
def test_staging_never_lies_and_never_blocks_a_swap(
    tmp_path_factory: Any, ops: list[str], seed: int, bound: int
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    registry, transport, rec = make_reconciler(tmp, max_staged=bound, max_pinned=1)
    sources = [fake_adapter(tmp / f"w{i}", seed=i) for i in range(3)]
    registry.publish("x", sources[0])
    run(rec.reconcile_once())
    rng = random.Random(seed)
    for op in ops:
        if op.startswith("publish"):
            registry.publish("x", rng.choice(sources), make_current=op == "publish-current")
        elif op == "promote":
            registry.promote("x", rng.choice(registry.versions("x")))
        elif op == "rollback":
            with contextlib.suppress(RegistryError):  # nothing to roll back to
                registry.rollback("x")
        elif op == "lose" and transport.table:
            transport.table.pop(rng.choice(sorted(transport.table)))
        staged_before = {
            e["version"] for e in status_of(rec, "x")["staged"] if e["state"] == "staged"
        }
        before = len(transport.loads())
        current = registry.current("x")
        asyncio.run(rec.reconcile_once())
        assert current is not None and serves(transport, "x", current), (op, transport.table)
        entries = status_of(rec, "x")["staged"]
        assert len(entries) <= bound
        for e in entries:
            assert e["state"] == "staged"
            assert f"x@{e['version']}" in transport.table  # loaded, really
            assert e["version"] != current
        if op in ("promote", "rollback") and current in staged_before:
            # staged before the move (and still loaded): the swap loaded nothing of it
            assert f"x@{current}" not in transport.loads()[before:]
        assert status_of(rec, "x")["live"] == current
    registry_ok(registry)


def registry_ok(registry: Registry) -> None:
    assert registry.current("x") in registry.versions("x")


def test_staging_uses_only_the_engine_room_the_names_leave(tmp_path: Path) -> None:
    """Found live: with --max-cpu-loras 8 and 4 pinned, reserving 4 staged left no room
    for the one name, which went lazy. Staging now takes only the spare room."""
    registry, _, rec = make_reconciler(tmp_path, max_staged=4, max_pinned=4, engine_bound=8)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    for seed in (2, 3, 4, 5):
        registry.publish(
            "y", fake_adapter(tmp_path / f"y{seed}", seed=seed), make_current=seed == 2
        )
    run(rec.reconcile_once())
    assert status_of(rec, "x")["state"] == "live" and status_of(rec, "y")["state"] == "live"
    assert rec.status()["preload"]["policy"] == "all"
    assert rec.status()["max_staged"] == 2  # 8 - 4 pinned - 2 names
    assert staged(rec, "y") == {"v0004": "next"}
