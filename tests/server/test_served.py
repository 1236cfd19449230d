"""What is served (``server_plugin.served``): copies, routes, the standby LRU and leases,
with the fake transport."""

from __future__ import annotations

import shutil
from pathlib import Path

from fakes import make_reconciler, run
from helpers import fake_adapter, write_version

from server_plugin.reconciler import Reconciler
from server_plugin.served import Served
from server_plugin.status import AdapterStatus


def published(tmp: Path, n: int, **settings: object) -> tuple[Reconciler, Served]:
    registry, _, rec = make_reconciler(tmp, **settings)
    for seed in range(n):
        registry.publish("x", fake_adapter(tmp / f"a{seed}", seed=seed), make_current=False)
    run(rec.reconcile_once())  # no current version: nothing loads
    return rec, rec.served


def test_load_then_route_puts_the_replaced_copy_on_standby(tmp_path: Path) -> None:
    _, served = published(tmp_path, 2)

    async def scenario() -> None:
        v1 = await served.load("x", "v0001")
        assert served.is_loaded("x@v0001") and not served.standby  # loaded, not yet kept
        assert await served.route("x", v1) is None
        v2 = await served.load("x", "v0002")
        assert await served.route("x", v2) == "x@v0001"
        assert list(served.standby) == ["x@v0001"]  # a rollback is only a route
        await served.route("x", v1)
        assert list(served.standby) == ["x@v0002"] and served.routes["x"] == "x@v0001"

    run(scenario())


def test_standby_is_an_lru_that_spares_leased_copies(tmp_path: Path) -> None:
    rec, served = published(tmp_path, 4, max_pinned=2)
    transport = rec.transport

    async def keep(version: str) -> None:
        served.keep(served.served_name(await served.load("x", version)))

    async def scenario() -> None:
        for v in ("v0001", "v0002", "v0003"):
            await keep(v)
        served.lease("x@v0001")  # a request in flight asked for it
        await served.evict()
        assert list(served.standby) == ["x@v0001", "x@v0003"]  # v0002 went, v0001 is held
        served.release("x@v0001")
        await keep("v0004")
        await served.evict()
        assert list(served.standby) == ["x@v0003", "x@v0004"]

    run(scenario())
    assert set(transport.table) == {"x@v0003", "x@v0004"}  # type: ignore[attr-defined]


def test_a_served_name_never_stands_for_two_contents(tmp_path: Path) -> None:
    """A version number whose content changed loads under ``name@vN+key`` even after its
    first copy was unloaded: vLLM must never see one name under two LoRA ids while requests
    admitted with the old one may still run."""
    rec, served = published(tmp_path, 1, max_pinned=0)
    registry = rec.registry

    async def scenario() -> None:
        first = await served.load("x", "v0001")
        await served.unload(served.served_name(first))
        shutil.rmtree(registry.version_dir("x", "v0001"))
        write_version(registry, "x", fake_adapter(tmp_path / "other", seed=9), make_current=False)
        second = await served.load("x", "v0001")
        assert second.key != first.key
        assert served.served_name(second) == f"x@v0001+{second.key[:8]}"
        assert served.routes["x@v0001"] == served.served_name(second)  # the pin follows
        again = await served.load("x", "v0001")  # the same content again: the same copy
        assert again is second

    run(scenario())
    assert rec.transport.loads() == ["x@v0001", f"x@v0001+{served.routes['x@v0001'][-8:]}"]  # type: ignore[attr-defined]


def test_a_swap_reports_itself_in_the_names_status(tmp_path: Path) -> None:
    _, served = published(tmp_path, 1)
    st = AdapterStatus("x", desired="v0001")

    async def scenario() -> bool:
        key = served.key("x", "v0001")
        return await served.swap(st, "v0001", key, None)

    assert run(scenario())
    assert (st.state, st.live, st.error, st.attempts) == ("live", "v0001", None, 0)
    assert st.path is not None and st.sha256 is not None and st.swap_seconds is None
    st_missing = AdapterStatus("x", desired="v0009")
    assert not run(served.swap(st_missing, "v0009", None, None))
    assert (st_missing.state, st_missing.error_kind) == ("failed", "permanent")
    assert "x@v0009 not found" in (st_missing.error or "")


def test_copies_in_use_can_be_read_from_the_cache_thread_during_loads(tmp_path: Path) -> None:
    """The cache asks ``in_use`` from its worker thread (a bounded copy making room) while
    lazy loads on the event loop change what is loaded: that read must not fail."""
    import sys
    import threading

    _, _, rec = make_reconciler(tmp_path)
    served = rec.served
    served.actual = {f"n{i}": f"/c/{i}" for i in range(5000)}
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
                served.actual[f"x{i}"] = "/c/x"
            for i in range(500):
                del served.actual[f"x{i}"]
            if errors:
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    assert errors == []
