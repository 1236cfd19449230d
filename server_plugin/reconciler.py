"""The reconcile loop: make what a server serves match what the registry says.

Desired state: for each adapter name in the registry, the version ``current`` points to and
the sha256 of its manifest (its content). Actual state: what the server really serves,
read from its ``Transport`` at the start of every pass (vLLM's LoRA table in-process,
``GET /v1/models`` for the sidecar), so a lost load or a restarted server heals itself.
Each pass is level-triggered and idempotent; filesystem events only wake the loop early.

The rooms it drives, top to bottom (import-linter holds the order):

- ``demand``: loads requests ask for (lazy names, pinned ``name@vNNNN``) and the preload
  policy;
- ``staging``: the versions that may go live next, loaded ahead (promote and rollback are
  then a route);
- ``served``: copies, routes, the standby LRU, content keys, the swap (load, then route);
- ``catalog``: the registry's names and versions as this loop last saw them;
- ``status`` and ``failures``: what ``/v1/adapters`` says per name, and the one memory of
  failed loads (permanent until the content or ``current`` changes, transient with backoff).

Absence is not deletion: a registry root without its marker file, empty or unreadable is
"unavailable" (serve what is loaded, unload nothing); a name whose folders cannot be read
is kept as it is; a name is unloaded only after it has been absent for ``unload_after``
passes, at most ``max_removals`` names per pass.

A pass visits the names whose pointer or content changed since they were last visited,
the names something is loaded for, and those not settled (loading, failed, retrying); at
10,000 lazy names that is a few instead of all, and the loop yields to requests every
``YIELD_EVERY`` names. Every visited or served name's status is written from what the
server really serves; the others did not change.

No vLLM import here: the plugin (in-process) and the sidecar (over HTTP) share this code
and differ only in their transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent_finetune.registry import CURRENT, Registry
from agent_finetune.registry.index import Pointer, pointers
from agent_finetune.registry.layout import MARKER
from agent_finetune.registry.names import utc_now, version_number
from server_plugin import metrics
from server_plugin.cache import AdapterCache
from server_plugin.catalog import Catalog
from server_plugin.demand import Demand
from server_plugin.failures import Failures, Refusal, describe
from server_plugin.preload import PreloadPolicy, Usage
from server_plugin.served import Copy, Served, Transport
from server_plugin.settings import ENV_UNLOAD_AFTER, Settings
from server_plugin.staging import Stager, Want
from server_plugin.status import AdapterStatus, utc_at

logger = logging.getLogger(__name__)

PinRefusal = Refusal  # the name the request middleware knew it by
YIELD_EVERY = 200
"""Names visited between two yields to the event loop (requests wait meanwhile)."""


@dataclass
class _Desired:
    available: bool
    reason: str | None = None
    # name -> its pointer and the manifest's content key (None for lazy or unreadable ones)
    names: dict[str, tuple[Pointer, str | None]] = field(default_factory=dict)
    stage: list[Want] = field(default_factory=list)


def _call(hook: Callable[[], object] | None, what: str) -> None:
    if hook is not None:
        try:
            hook()
        except Exception:
            logger.exception("agent_finetune: %s hook failed", what)


class Reconciler:
    """Drive a ``Transport`` until it serves each registry name's current version."""

    def __init__(
        self,
        registry: Registry,
        cache: AdapterCache,
        transport: Transport,
        settings: Settings | None = None,
        *,
        engine_bound: int | None = None,
        usage: Usage | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.transport = transport
        self.settings = settings = settings or Settings()
        self.failures = Failures(settings.retry_base_s, settings.retry_max_s, rng)
        self.served = Served(
            registry, cache, transport, self.failures, max_standby=settings.max_pinned
        )
        self.catalog = Catalog(registry)
        self.stager = Stager(self.served, self.failures, self.catalog, settings.max_staged)
        self._status: dict[str, AdapterStatus] = {}
        self.demand = Demand(
            self.served,
            self.failures,
            self.catalog,
            self._status,
            settings,
            engine_bound=engine_bound,
            usage=usage,
        )
        self._desired_seen: dict[str, tuple[str | None, str | None]] = {}
        self._absent: dict[str, int] = {}
        self._pointers: dict[str, Pointer] = {}  # pointer scan memo
        self._visited: dict[str, tuple[Pointer, str | None]] = {}  # as last reconciled
        self._live_series: set[str] = set()  # names with a live-version series
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self.last_sync: str | None = None
        self.sync_error: str | None = None
        self.registry_available: bool | None = None
        self.passes = 0
        self.last_pass_s: float | None = None

    # -- the loop -----------------------------------------------------------------------
    async def run(
        self,
        before_pass: Callable[[], object] | None = None,
        after_pass: Callable[[], object] | None = None,
    ) -> None:
        """Reconcile now, then whenever woken, every ``resync_s`` seconds, or when a retry
        is due, until stop(). ``before_pass`` runs before each pass (e.g. to (re)start a
        filesystem watcher), ``after_pass`` after it (e.g. to write the status)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not self._stopping:
            _call(before_pass, "before_pass")
            await self.reconcile_once()
            _call(after_pass, "after_pass")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        due = self.failures.next_due()
        if due is None:
            return self.settings.resync_s
        return min(self.settings.resync_s, max(0.05, due - time.monotonic()))

    def wake(self) -> None:
        """Run a pass soon. Safe to call from any thread (watchdog's observer thread)."""
        loop, event = self._loop, self._wake
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed since the check
            loop.call_soon_threadsafe(event.set)

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def reconcile_once(self) -> None:
        """One level-triggered pass. Never raises: every problem is logged and reported."""
        t0 = time.monotonic()
        try:
            desired = await asyncio.to_thread(self._read_desired)
        except Exception as e:
            desired = _Desired(False, f"cannot read registry {self.registry.root}: {describe(e)}")
            logger.exception("agent_finetune: %s", desired.reason)
        self.registry_available = desired.available
        self.sync_error = desired.reason
        metrics.REGISTRY_AVAILABLE.set(1 if desired.available else 0)
        actual = await self.served.read_actual()
        visited: set[str] | None = None
        if actual is not None and desired.available:
            visited = await self._reconcile_names(desired)
            await self._remove_absent(desired)
            await self.served.drop_stale()
            if await self.stager.apply(desired.stage, self.served.name_lock):
                self.wake()  # more to stage: the next pass at once, one load each
            await self.served.evict()
        self._report(visited)
        try:
            await asyncio.to_thread(self.cache.collect)
        except Exception:
            logger.exception("agent_finetune: cleaning the cache failed")
        self.demand.usage.save()
        self.last_sync = utc_now()
        self.last_pass_s = round(time.monotonic() - t0, 6)
        self.passes += 1

    # -- desired state --------------------------------------------------------------------
    def _read_desired(self) -> _Desired:
        """Every name's pointer and content key, or "unavailable"."""
        root = self.registry.root
        try:
            entries = os.listdir(root)
        except OSError as e:
            return _Desired(
                False,
                f"registry {root} is unreadable ({e.strerror or e}); "
                "serving what is loaded, unloading nothing",
            )
        if MARKER not in entries:
            what = "is empty" if not entries else f"has no marker file {MARKER}"
            return _Desired(
                False,
                f"registry {root} {what} (an unmounted volume or a recreated folder?); "
                "serving what is loaded, unloading nothing. Every agent-finetune write "
                f"leaves the marker; for an older registry: touch {root / MARKER}",
            )
        out = _Desired(True)
        # One pass over the root; a pointer is re-read only when its stat changed.
        found = pointers(self.registry, self._pointers)
        self.catalog.update(found)
        if self.demand.policy is None:
            self.demand.resolve_policy({n: p.moved_at for n, p in found.items()})
            self.stager.max_staged = self.demand.stage_room
        for name, pointer in found.items():
            # A lazy name's manifest is read when its first request loads it, not per pass.
            key = None
            if pointer.version is not None and not self.demand.is_lazy(name):
                key = self.served.key(name, pointer.version)
            out.names[name] = (pointer, key)
        out.stage = self.stager.plan(found, lambda n: not self.demand.is_lazy(n))
        return out

    # -- one name ---------------------------------------------------------------------------
    async def _reconcile_names(self, desired: _Desired) -> set[str]:
        """Reconcile the names that may need it (see the module docstring); return them."""
        visited: set[str] = set()
        for name, (pointer, key) in sorted(desired.names.items()):
            if not self._needs_visit(name, pointer, key):
                continue
            visited.add(name)
            if len(visited) % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let requests in between
            self._absent.pop(name, None)
            st = self._status.setdefault(name, AdapterStatus(name))
            try:
                async with self.served.name_lock(name):
                    await self._reconcile_name(st, pointer, key)
            except Exception as e:  # a bug, not a bad adapter: log it, keep the others going
                logger.exception("agent_finetune: reconciling %r failed", name)
                st.note(describe(e), pointer.version, "transient")
            self._visited[name] = (pointer, key)
        return visited

    def _needs_visit(self, name: str, pointer: Pointer, key: str | None) -> bool:
        """Whether a pass must look at ``name``: every name but the lazy ones that did not
        change (new, pointer, ``versions/`` or content), show no error and are not loaded:
        at 10,000 lazy names, all but a few."""
        st = self._status.get(name)
        return (
            st is None
            or st.state != "lazy"
            or self._visited.get(name) != (pointer, key)
            or st.error is not None
            or st.absent_passes > 0
            or name in self.served.routes
            or name in self.demand.active
        )

    async def _reconcile_name(self, st: AdapterStatus, pointer: Pointer, key: str | None) -> None:
        name, version = st.name, pointer.version
        st.absent_passes = 0
        if pointer.error is not None:
            # Unreadable now (EIO, ESTALE, EACCES): nothing is known, so nothing changes.
            st.note(f"{pointer.error}; serving what is loaded", st.desired, "transient")
            return
        st.desired = version
        st.desired_since = utc_at(pointer.moved_at) if pointer.moved_at is not None else None
        if self._desired_seen.get(name) != (version, key):
            # `current` moved (or its content changed): forget what failed before.
            self._desired_seen[name] = (version, key)
            self.failures.forget(name)
        serving = self.served.serving(name)
        if version is None:
            st.state = "live" if serving is not None else "failed"
            st.note(
                f"{self.registry.name_dir(name) / CURRENT}: missing or unreadable; "
                "run `agent-finetune promote` or `rollback` to set it",
                None,
                "permanent",
            )
            return
        if key is None and serving is not None and serving.version == version:
            # The version's folder left the registry (or its manifest is unreadable): the
            # verified copy keeps serving; nothing to load.
            st.settle("live")
            st.note(
                f"{self.registry.version_dir(name, version)}: missing or unreadable in the "
                "registry; serving the server's verified copy",
                version,
                "transient",
            )
            return
        if self.demand.is_lazy(name):
            # Its failures are keyed by the content its load read (the pass reads none).
            failure = self.failures.of_version(name, version)
            if failure is not None:
                st.show(failure, version)
            else:
                st.settle("lazy")
            return
        if self.served.is_serving(name, version, key):
            self.failures.clear((name, version, key))
            st.settle("live")  # clears older versions' errors too
            return
        failure = self.failures.blocking((name, version, key))
        if failure is not None:
            st.show(failure, version)
            return
        await self.served.swap(
            st, version, key, pointer.moved_at, bounded=name in self.demand.active
        )

    async def _remove_absent(self, desired: _Desired) -> None:
        """Unload names absent for ``unload_after`` passes, at most ``max_removals`` now."""
        known = set(self._status) | {n for n in self.served.routes if "@" not in n}
        removed, limit = 0, self.settings.unload_after
        for name in sorted(known - desired.names.keys()):
            count = self._absent[name] = self._absent.get(name, 0) + 1
            st = self._status.get(name)
            if count < limit or removed >= self.settings.max_removals:
                if st is not None:
                    st.absent_passes = count
                    st.error = (
                        f"{name} is not in the registry ({count} pass(es)); unloaded after "
                        f"{limit} ({ENV_UNLOAD_AFTER})"
                    )
                continue
            removed += 1
            try:
                await self._remove(name)
            except Exception:
                logger.exception("agent_finetune: removing %r failed", name)

    async def _remove(self, name: str) -> None:
        """The name's folder left the registry: stop serving it and its versions."""
        async with self.served.name_lock(name):
            await self.served.remove(name)
            self._status.pop(name, None)
            self._absent.pop(name, None)
            self._desired_seen.pop(name, None)
            self._pointers.pop(name, None)
            self._visited.pop(name, None)
            self.demand.forget(name)
            self.stager.forget(name)
            self.failures.forget(name)
            self._live_series.discard(name)
            with contextlib.suppress(KeyError):
                metrics.LIVE_VERSION.remove(name)
            logger.info("agent_finetune: %s left the registry; no longer served", name)

    # -- requests ---------------------------------------------------------------------------
    async def ensure(self, model: str, held: list[str] | None = None) -> Refusal | None:
        """Serve ``model`` (a name or ``name@vNNNN``) before its request reaches the server;
        None, or why not (``server_plugin.demand``). With ``held``, a request holds what
        ``model`` resolves to until ``release(held)``: it stays loaded meanwhile."""
        if held is None:
            return await self.demand.ensure(model)
        self.served.lease(model)
        try:
            refusal = await self.demand.ensure(model)
        except BaseException:
            self.served.release(model)
            raise
        if refusal is not None:
            self.served.release(model)
        else:
            held.append(model)
        return refusal

    def release(self, held: list[str]) -> None:
        """The request that ``ensure`` filled ``held`` for has ended."""
        for model in held:
            self.served.release(model)
        held.clear()

    def is_loaded(self, model: str) -> bool:
        return self.served.is_loaded(model)

    @property
    def lazy(self) -> bool:
        """Whether some names may load on their first request (``ensure`` matters)."""
        return self.demand.lazy

    @property
    def policy(self) -> PreloadPolicy | None:
        return self.demand.policy

    def lazy_names(self) -> list[str]:
        """Registry names with a current version that are not loaded now."""
        return sorted(
            n for n, st in self._status.items() if st.desired is not None and self.demand.is_lazy(n)
        )

    # -- reporting ------------------------------------------------------------------------
    def _report(self, visited: set[str] | None) -> None:
        """Write the live version of every visited or served name from what the server
        really serves (every name when the server could not be asked)."""
        actual, served = self.served.actual, self.served
        if actual is None or visited is None:
            names: set[str] | list[str] = list(self._status)
        else:
            names = visited | {n for n in served.routes if n in self._status}
            names |= self._live_series & self._status.keys()
        staged: dict[str, list[dict[str, Any]]] = {}
        for s, why in served.staged.items():
            copy = served.copies.get(s)
            if copy is not None and served.loaded(s):
                staged.setdefault(copy.name, []).append(_staged_entry(copy, why, s))
        for (name, version), error in self.stager.errors.items():
            staged.setdefault(name, []).append(
                {"version": version, "why": None, "state": "failed", "error": error}
            )
        for name in set(staged) | {n for n, st in self._status.items() if st.staged}:
            st = self._status.get(name)
            if st is not None:
                st.staged = sorted(staged.get(name, []), key=lambda e: e["version"])
        for name in names:
            st = self._status[name]
            if actual is None:
                st.unserved()
                if st.state == "live":
                    st.state = "retrying"
                st.error = self.served.server_error
                self._set_live(name, None)
                continue
            copy = self.served.serving(name)
            st.unserved()
            if copy is not None:
                st.live, st.path, st.sha256 = copy.version, str(copy.path), copy.key
            if st.state == "live" and (copy is None or copy.version != st.desired):
                st.state = "pending"
            self._set_live(name, copy.version if copy is not None else None)
        metrics.PINNED.set(len(self.served.standby))

    def _set_live(self, name: str, version: str | None) -> None:
        """The live-version series of names that serve something (bounded by what is
        loaded, not by the registry); a name that serves nothing has none."""
        if version is not None:
            metrics.LIVE_VERSION.labels(name).set(version_number(version))
            self._live_series.add(name)
        elif name in self._live_series:
            self._live_series.discard(name)
            with contextlib.suppress(KeyError):
                metrics.LIVE_VERSION.remove(name)

    def status(self) -> dict[str, Any]:
        """The state ``GET /v1/adapters`` returns."""
        served, demand = self.served, self.demand
        desired = {n: st.desired for n, st in self._status.items()}
        return {
            "object": "list",
            "registry": str(self.registry.root),
            "registry_available": self.registry_available,
            "cache_dir": str(self.cache.root),
            "cache_bytes": self.cache.bytes,
            "last_sync": self.last_sync,
            "sync_error": self.sync_error,
            "server_error": served.server_error,
            "data": [self._status[n].as_dict() for n in sorted(self._status)],
            "pinned": [
                {
                    "model": s,
                    "path": str(served.copies[s].path),
                    "load_seconds": served.copies[s].load_seconds,
                }
                for s in served.standby
                if s in served.copies
            ],
            "staged": [
                {"model": s, "name": served.copies[s].name, **_staged_entry(served.copies[s], w, s)}
                for s, w in served.staged.items()
                if served.loaded(s)
            ],
            "max_staged": self.stager.max_staged,
            "pinned_errors": {
                model: error
                for model, error in self.failures.errors().items()
                if desired.get(model.partition("@")[0]) != model.partition("@")[2]
            },
            "max_pinned": self.settings.max_pinned,
            "preload": {
                "setting": str(demand.preload),
                "policy": str(demand.policy) if demand.policy is not None else None,
                "preloaded": (
                    None
                    if demand.preloaded is None
                    else len(demand.preloaded & self._status.keys())
                ),
                "lazy_loaded": len(demand.active),
                "lazy_capacity": demand.lazy_capacity if demand.preloaded is not None else None,
                "stage_room": demand.stage_room,
                "engine_bound": demand.engine_bound,
                "hits": demand.hits,
                "misses": demand.misses,
            },
            "last_pass_seconds": self.last_pass_s,
            "pid": os.getpid(),
        }


def _staged_entry(copy: Copy, why: str, served: str) -> dict[str, Any]:
    """A staged copy as status shows it (only ones the server really has loaded)."""
    return {
        "version": copy.version,
        "why": why,
        "state": "staged",
        "served_as": served,
        "load_seconds": copy.load_seconds,
        "loaded_at": copy.loaded_at,
    }
