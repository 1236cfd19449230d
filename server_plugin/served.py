"""What the server serves: verified copies under their own names, and the names routed to them.

- A **copy** is one version's verified content (``server_plugin.cache``) loaded into the
  server under its own served name, ``<name>@vNNNN``. A version number whose content
  changed loads as ``<name>@vNNNN+<key>`` and ``<name>@vNNNN`` is routed to it: a served
  name never stands for two contents in one process, so vLLM never batches one name under
  two LoRA ids.
- A **route** makes a public name (or the ``name@vNNNN`` of a ``+key`` copy) resolve to a
  copy's own entry, in one step (never an in-place reload: requests already running finish
  on the version they started on).
- A copy no name routes to is **staged** or on **standby**. Staged copies are the versions
  that may go live next (``server_plugin.staging`` chooses them: a published version not
  current yet, a canary's candidate, the version a rollback returns to): kept loaded while
  chosen, so a promote or rollback to them is only a route. Standby holds the others
  (pinned versions, versions replaced and no longer chosen) in an LRU of ``max_standby``
  copies. A copy a request in flight holds a lease on is never unloaded, so a request's
  version is still there when vLLM looks its model up.

A swap is load, then route, and is reported in the name's status as it happens. What the
server really serves (``actual``) is read at the start of every pass from the
``Transport`` and kept current by our own changes; loads the server lost are forgotten, so
the pass loads them again. No vLLM import here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent_finetune.errors import AgentFinetuneError
from agent_finetune.registry import MANIFEST, Registry
from agent_finetune.registry.names import utc_now
from server_plugin import metrics
from server_plugin.cache import AdapterCache, manifest_key
from server_plugin.failures import Failures, describe
from server_plugin.status import AdapterStatus

logger = logging.getLogger(__name__)


class Transport(Protocol):
    """How the reconciler reads and changes what a server serves."""

    async def served(self) -> dict[str, str]:
        """Every name the server serves now -> the adapter path it serves it from."""
        ...

    async def load(self, served_name: str, path: str) -> None:
        """Load the adapter at ``path`` under ``served_name``; raise LoadError on refusal,
        ServerUnavailableError (an OSError) when the server could not answer."""
        ...

    async def repoint(self, name: str, target: str) -> None:
        """Make ``name`` serve exactly what the loaded ``target`` serves, in one step."""
        ...

    async def unload(self, served_name: str) -> None:
        """Stop serving ``served_name`` (unknown names are ignored)."""
        ...


@dataclass(frozen=True)
class Copy:
    """One version's verified content, loaded into the server under its own served name."""

    name: str
    version: str
    key: str
    path: Path
    load_seconds: float | None = None  # copy + verify + the server's load
    loaded_at: str | None = None


class Served:
    """The server's copies, routes and standby LRU, changed only through its transport."""

    def __init__(
        self,
        registry: Registry,
        cache: AdapterCache,
        transport: Transport,
        failures: Failures,
        *,
        max_standby: int,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.transport = transport
        self.failures = failures
        self.max_standby = max_standby
        self.copies: dict[str, Copy] = {}  # served name -> the copy it serves
        self.routes: dict[str, str] = {}  # public name (or name@vN of a +key copy) -> served
        self.standby: OrderedDict[str, None] = OrderedDict()  # loaded, unrouted, not staged
        self.staged: dict[str, str] = {}  # loaded ahead of going live -> why (staging)
        self._paths: dict[str, set[str]] = {}  # str(copy path) -> served names of copies
        self._content: dict[tuple[str, str, str], str] = {}  # (name, version, key) -> served
        self._named: dict[str, str] = {}  # every served name used here -> its content key
        self._keys: dict[Path, tuple[tuple[int, int, int], str]] = {}  # manifest stat memo
        self._leases: Counter[str] = Counter()  # model -> requests in flight that asked for it
        self._version_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._name_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.started = time.time()
        # What the server serves: read once per pass, then kept current by our own changes.
        self.actual: dict[str, str] | None = None
        self.server_error: str | None = None
        self._ever_served: set[Path] = set()  # paths the server held while it was unreachable
        cache.in_use = self.in_use

    def name_lock(self, name: str) -> asyncio.Lock:
        """Held while a name's route changes (a swap, a lazy load, an eviction, a removal)."""
        return self._name_locks[name]

    # -- content keys -----------------------------------------------------------------------
    def key(self, name: str, version: str) -> str | None:
        """The manifest's content key, re-read only when its stat changes; None if absent.
        Blocking file IO: async callers run it in a thread."""
        try:
            path = self.registry.version_dir(name, version) / MANIFEST
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            memo = self._keys.get(path)
            if memo is not None and memo[0] == stamp:
                return memo[1]
            key = manifest_key(path.read_bytes())
        except (OSError, ValueError):
            return None
        self._keys[path] = (stamp, key)
        return key

    def forget_keys(self, name: str) -> None:
        for path in [p for p in self._keys if p.parent.parent.parent.name == name]:
            del self._keys[path]

    # -- reality ----------------------------------------------------------------------------
    async def read_actual(self) -> dict[str, str] | None:
        """Ask the server what it serves; None (and ``server_error``) when it cannot say.
        Loads it lost (restarted, unloaded by hand) are forgotten, so they load again."""
        try:
            actual = await self.transport.served()
        except Exception as e:
            self.server_error = f"cannot read what the server serves: {describe(e)}"
            logger.warning("agent_finetune: %s", self.server_error)
            if self.actual is not None:
                self._ever_served = {Path(p) for p in self.actual.values()}
            self.actual = None
            return None
        self.server_error = None
        self._ever_served = set()
        self.actual = actual
        for served, copy in list(self.copies.items()):
            if actual.get(served) != str(copy.path):
                logger.warning("agent_finetune: the server lost %s; loading it again", served)
                self._drop_copy(served)
        for alias, served in list(self.routes.items()):
            if served not in self.copies:
                del self.routes[alias]
        return actual

    def in_use(self) -> set[Path]:
        """Copies the server may re-read: our loads and whatever it serves (or, while it
        cannot be asked, whatever it served when last asked)."""
        # Called from the cache's worker thread (a bounded copy making room) while loads on
        # the event loop change these maps: list() copies each one without releasing the GIL.
        paths = {c.path for c in list(self.copies.values())}
        paths |= {Path(p) for p in list((self.actual or {}).values())}
        return paths | set(self._ever_served)

    # -- what is served ---------------------------------------------------------------------
    def serving(self, name: str) -> Copy | None:
        """The copy the server really serves under ``name`` (None when none of ours).
        O(1): every pass asks it for every name."""
        path = (self.actual or {}).get(name)
        if path is None:
            return None
        for served in self._paths.get(path, ()):
            copy = self.copies.get(served)
            if copy is not None and copy.name == name:
                return copy
        return None

    def loaded(self, served: str) -> bool:
        """Whether the server really serves the copy ``served`` (its own name, its path)."""
        copy = self.copies.get(served)
        return copy is not None and (self.actual or {}).get(served) == str(copy.path)

    def is_serving(self, name: str, version: str, key: str | None) -> bool:
        """Whether ``name`` is routed to, and really serves, this content of ``version``."""
        served = self._content.get((name, version, key)) if key is not None else None
        if served is None or self.routes.get(name) != served:
            return False
        return (self.actual or {}).get(name) == str(self.copies[served].path)

    def is_loaded(self, model: str) -> bool:
        """Whether requests for ``model`` (a routed name or a served name) resolve now."""
        return model in self.copies or model in self.routes

    def served_name(self, copy: Copy) -> str:
        return self._content[(copy.name, copy.version, copy.key)]

    def names_of(self, name: str) -> list[str]:
        """The served names of every loaded copy of adapter ``name``."""
        return [s for s, c in self.copies.items() if c.name == name]

    # -- leases: a request in flight keeps what it asked for loaded -------------------------
    def lease(self, model: str) -> None:
        """Hold whatever ``model`` resolves to (now or once loaded) until ``release``."""
        self._leases[model] += 1

    def release(self, model: str) -> None:
        if self._leases[model] <= 1:
            del self._leases[model]
        else:
            self._leases[model] -= 1

    def leased(self, served: str) -> bool:
        """Whether a request in flight asked for a model that resolves to ``served``."""
        return any(self.routes.get(m, m) == served for m in list(self._leases))

    # -- changes ----------------------------------------------------------------------------
    async def load(self, name: str, version: str, *, bounded: bool = False) -> Copy:
        """Load ``name@version``'s current content under its own served name, routed to by
        no name yet (once, however many callers wait). ``bounded``: the copy counts against
        the cache's byte bound."""
        vname = f"{name}@{version}"
        async with self._version_locks[vname]:
            t0 = time.monotonic()
            path, key = await asyncio.to_thread(
                self.cache.prepare, self.registry, name, version, bounded=bounded
            )
            prepared = time.monotonic() - t0
            served = self._content.get((name, version, key))
            if served is not None and served in self.copies:
                return self.copies[served]
            t0 = time.monotonic()
            served = self._served_name_for(name, version, key)
            await self.transport.load(served, str(path))
            if self.actual is not None:
                self.actual[served] = str(path)
            took = time.monotonic() - t0
            copy = Copy(name, version, key, path, round(prepared + took, 6), utc_now())
            self.copies[served] = copy
            self._paths.setdefault(str(path), set()).add(served)
            self._content[(name, version, key)] = served
            self._named[served] = key
            if served != vname:
                # The version's content changed (a reused number): `name@vN` answers with
                # the new content from now on; the old copy is no longer addressable.
                displaced = vname in self.copies  # the old content, under its own name
                await self._route(vname, served)
                if displaced:  # a name still on it is swapped next
                    self._drop_copy(vname)
            metrics.LOADS.labels(name).inc()
            metrics.LOAD_SECONDS.observe(prepared + took)
            logger.info("agent_finetune: loaded %s from %s", served, path)
            return copy

    def _served_name_for(self, name: str, version: str, key: str) -> str:
        vname = f"{name}@{version}"
        used = self._named.get(vname)
        if (used is None or used == key) and vname not in self.routes:
            return vname
        return f"{vname}+{key[:8]}"

    async def route(self, name: str, copy: Copy) -> str | None:
        """Make ``name`` resolve to ``copy`` in one step; the copy it left goes on standby
        (staging keeps it, as the rollback target). Returns that previous served name."""
        served = self.served_name(copy)
        old = self.routes.get(name)
        await self._route(name, served)
        self.standby.pop(served, None)
        self.staged.pop(served, None)
        if old is not None and old != served and old in self.copies and old not in self.staged:
            self.standby[old] = None
        return old

    async def _route(self, alias: str, served: str) -> None:
        await self.transport.repoint(alias, served)
        self.routes[alias] = served
        if self.actual is not None:
            self.actual[alias] = str(self.copies[served].path)

    def keep(self, served: str) -> None:
        """Keep a loaded copy no name routes to, as the most recently used on standby."""
        if served in self.copies and served not in self.staged and not self.routed(served):
            self.standby[served] = None
            self.standby.move_to_end(served)

    def routed(self, served: str) -> bool:
        return served in self.routes.values()

    def stage(self, served: str, why: str) -> None:
        """Keep ``served`` loaded ahead of going live (``why``: next, canary, rollback)."""
        if served in self.copies and not self.routed(served):
            self.standby.pop(served, None)
            self.staged[served] = why

    def unstage(self, served: str) -> None:
        """No longer chosen ahead: the copy joins the standby LRU (unloaded in its turn)."""
        if self.staged.pop(served, None) is not None:
            self.keep(served)

    async def evict(self) -> None:
        """Unload the least recently used standby copies beyond ``max_standby`` (none that
        a request in flight holds)."""
        for served in list(self.standby):
            if len(self.standby) <= self.max_standby:
                break
            if not self.leased(served):
                await self.unload(served)
        metrics.PINNED.set(len(self.standby))

    async def unload(self, served: str) -> None:
        """Stop serving a copy and every alias routed to it."""
        aliases = [a for a, s in self.routes.items() if s == served]
        for name in [*aliases, served]:
            try:
                await self._unload_name(name)
            except Exception:
                logger.exception("agent_finetune: unloading %s failed", name)
            self.routes.pop(name, None)
        self._drop_copy(served)

    async def _unload_name(self, name: str) -> None:
        if self.actual is not None:
            self.actual.pop(name, None)
        await self.transport.unload(name)

    def _drop_copy(self, served: str) -> None:
        copy = self.copies.pop(served, None)
        self.standby.pop(served, None)
        self.staged.pop(served, None)
        if copy is None:
            return
        same_path = self._paths.get(str(copy.path))
        if same_path is not None:
            same_path.discard(served)
            if not same_path:
                del self._paths[str(copy.path)]
        if self._content.get((copy.name, copy.version, copy.key)) == served:
            del self._content[(copy.name, copy.version, copy.key)]
        if str(copy.path) not in self._paths:
            self.cache.release(copy.path)

    async def remove(self, name: str) -> None:
        """The name's folder left the registry: stop serving it and its versions."""
        if self.routes.pop(name, None) is not None:
            try:
                await self._unload_name(name)
            except Exception:
                logger.exception("agent_finetune: unloading %s failed", name)
        for served in self.names_of(name):
            await self.unload(served)
        self.forget_keys(name)
        metrics.PINNED.set(len(self.standby))

    async def drop_stale(self) -> None:
        """A staged or standby copy whose registry content changed is unloaded; its next
        request (or staging) loads the new content (a routed name is handled by its swap)."""
        for served in [*self.standby, *self.staged]:
            copy = self.copies.get(served)
            if copy is None or self.leased(served):
                continue
            key = await asyncio.to_thread(self.key, copy.name, copy.version)
            if key is not None and key != copy.key:
                logger.info("agent_finetune: %s changed in the registry; unloading", served)
                await self.unload(served)

    # -- a swap: load, then route, reported as it happens -----------------------------------
    async def swap(
        self,
        st: AdapterStatus,
        version: str,
        key: str | None,
        moved_at: float | None,
        *,
        bounded: bool = False,
    ) -> bool:
        """Serve ``version`` under ``st.name``; on failure remember it, show it, keep what
        serves. ``bounded``: the copy counts against the cache's byte bound (lazy names)."""
        name, fkey = st.name, (st.name, version, key)
        ready = key is not None and self._content.get((name, version, key)) in self.copies
        st.state = "loading"
        t0 = time.monotonic()
        try:
            ready_as = self._content.get((name, version, key)) if key is not None else None
            if ready_as is not None and self.loaded(ready_as):
                copy = self.copies[ready_as]  # staged or on standby: route it, nothing to read
            else:
                copy = await self.load(name, version, bounded=bounded)
            load_s = time.monotonic() - t0
            old = await self.route(name, copy)
        except Exception as e:
            failure = self.failures.record(fkey, e)
            st.show(failure, version)
            log = logger.warning if failure.kind == "permanent" else logger.info
            if not isinstance(e, (AgentFinetuneError, OSError)):
                log = logger.exception
            log(
                "agent_finetune: %s@%s %s (%s, attempt %d), %s keeps serving %s: %s",
                name,
                version,
                "rejected" if failure.kind == "permanent" else "failed",
                failure.kind,
                failure.attempts,
                name,
                st.live,
                failure.error,
            )
            await self.evict()
            return False
        self.failures.clear(fkey)
        st.settle("live")
        # Serving it from this moment: say so now, not at the end of the pass. A staged
        # copy was loaded before: its own load time, not this repoint's.
        st.live, st.path, st.sha256 = version, str(copy.path), copy.key
        st.loaded_at, st.load_seconds = copy.loaded_at or utc_now(), copy.load_seconds
        if copy.load_seconds is None:
            st.load_seconds = round(load_s, 6)
        # Pointer moves from before this process started are start-up loads, not swaps.
        st.swap_seconds, st.swap_loaded = None, not ready
        if moved_at is not None and moved_at >= self.started:
            st.swap_seconds = round(time.time() - moved_at, 6)
            metrics.SWAP_SECONDS.observe(max(0.0, st.swap_seconds))
        metrics.SWAPS.labels(name).inc()
        logger.info("agent_finetune: %s now serves %s (was %s)", name, self.served_name(copy), old)
        await self.evict()
        return True
