"""Loads that requests ask for: lazy names and pinned ``name@vNNNN``, on one road.

The request middleware calls :meth:`Demand.ensure` with a request's ``model`` before vLLM
looks it up. A model that is served is a hit. Otherwise, when it is ours to load (a lazy
name under the preload policy, or a published version of a registry name), its load runs
once however many requests wait for it, at most ``max_loads`` at a time; a request that
cannot get a load slot within ``load_wait_s`` is answered 503 instead of queueing behind
slow loads. A version that failed is refused from the one failure memory
(``server_plugin.failures``) without loading it again. Anything else (an unknown name or
version) is left to vLLM, which answers 404.

Lazy names (``server_plugin.preload``): a name the policy does not preload waits in state
``lazy`` until its first request; once loaded it follows ``current`` like a preloaded one,
in an LRU of ``lazy_capacity`` names. Pinned versions stay on the served standby LRU
(``server_plugin.served``). A request in flight holds a lease on what it asked for, so
neither LRU unloads it before vLLM has resolved the model (or while it runs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict

from agent_finetune.errors import AgentFinetuneError
from agent_finetune.registry.history import POINTER_MOVES
from agent_finetune.registry.names import is_name, split_model
from server_plugin.catalog import Catalog
from server_plugin.failures import Failures, Refusal
from server_plugin.preload import PreloadPolicy, Usage
from server_plugin.served import Served
from server_plugin.settings import ENV_LOAD_WAIT, ENV_MAX_LOADS, ENV_MAX_PINNED, ENV_PINS, Settings
from server_plugin.status import AdapterStatus

logger = logging.getLogger(__name__)


class Demand:
    """Request-time loads of lazy names and pinned versions, and the preload policy."""

    def __init__(
        self,
        served: Served,
        failures: Failures,
        catalog: Catalog,
        statuses: dict[str, AdapterStatus],
        settings: Settings,
        *,
        engine_bound: int | None = None,
        usage: Usage | None = None,
    ) -> None:
        self.served = served
        self.failures = failures
        self.catalog = catalog
        self.statuses = statuses  # the reconcile loop's, one per registry name
        self.settings = settings
        self.preload = PreloadPolicy.parse(settings.preload)
        # Adapters the engine keeps in memory (--max-cpu-loras): `auto` preloads every name
        # while they fit in it.
        self.engine_bound = engine_bound
        self.usage = usage or Usage(None)
        self.policy: PreloadPolicy | None = None  # `preload` resolved at the first pass
        self.preloaded: frozenset[str] | None = None  # None: every name
        self.active: OrderedDict[str, None] = OrderedDict()  # lazy names loaded on demand
        self.lazy_capacity = 0
        self.stage_room = 0  # versions staging may keep loaded (the engine's spare room)
        self.hits = 0  # requests whose model was served when they arrived
        self.misses = 0  # requests that waited for a load (their own or a shared one)
        self._pending: dict[str, asyncio.Future[Refusal | None]] = {}
        self._slots = asyncio.Semaphore(settings.max_loads)

    # -- the preload policy -----------------------------------------------------------------
    def resolve_policy(self, moved: dict[str, float | None]) -> None:
        """Fix the preload policy at the first readable pass: ``auto`` becomes ``all`` or
        ``recent:N`` by the engine's bound, and the preloaded names are chosen."""
        n_names, pinned = len(moved), self.settings.max_pinned
        staged = self.settings.max_staged
        bound = self.engine_bound if self.engine_bound is not None else n_names + pinned + staged
        room = max(0, bound - pinned)
        self.policy = self.preload.resolve(n_names, room)
        self.preloaded = self.policy.choose(moved, self.usage.used_at)
        n_pre = n_names if self.preloaded is None else len(self.preloaded & moved.keys())
        # Staged versions use the engine's room the names leave (never the names' own);
        # loaded lazy names share what is left with the preloaded ones, at least a few, so
        # concurrent first requests never unload each other's name.
        spare = room - n_pre
        if self.preloaded is None:
            self.stage_room = min(staged, max(0, spare))
        else:
            self.stage_room = min(staged, max(0, spare - 2 * self.settings.max_loads))
        self.lazy_capacity = max(2 * self.settings.max_loads, spare - self.stage_room)
        logger.info(
            "agent_finetune: preload %s (%s): %d of %d names preloaded, up to %d lazy ones "
            "loaded at once, up to %d versions staged",
            self.policy,
            self.preload,
            n_pre,
            n_names,
            self.lazy_capacity,
            self.stage_room,
        )

    def is_lazy(self, name: str) -> bool:
        """A name the policy does not preload and no request has loaded (or kept) yet."""
        return self.preloaded is not None and name not in self.preloaded and name not in self.active

    @property
    def lazy(self) -> bool:
        """Whether some names may load on their first request (``ensure`` matters)."""
        return self.policy is None or self.preloaded is not None

    def forget(self, name: str) -> None:
        """``name`` left the registry."""
        self.active.pop(name, None)

    # -- the road ---------------------------------------------------------------------------
    async def ensure(self, model: str) -> Refusal | None:
        """Serve ``model`` before its request reaches vLLM: load it when it is a lazy name or
        a published version of a registry name.

        Returns None when it is served (or not ours: vLLM answers 404), else why not (400
        for content the server refuses, 503 for a transient failure or no free load slot).
        """
        if self.served.is_loaded(model):
            self.hits += 1
            self._touch(model)
            return None
        pending = self._pending.get(model)
        if pending is None:
            if not self._ours(model):
                return None
            pending = asyncio.ensure_future(self._load(model))
            self._pending[model] = pending
            pending.add_done_callback(functools.partial(self._done, model))
        self.misses += 1
        return await asyncio.shield(pending)

    def _touch(self, model: str) -> None:
        if model in self.active:
            self.active.move_to_end(model)
        served = self.served.routes.get(model, model)
        if served in self.served.standby:
            self.served.standby.move_to_end(served)
        if "@" not in model:
            self.usage.touch(model)

    def _ours(self, model: str) -> bool:
        """Whether ``model`` may be ours to load, judged from memory only."""
        parsed = split_model(model)
        if parsed is not None:
            return self.catalog.knows(parsed[0])
        st = self.statuses.get(model)
        return is_name(model) and self.is_lazy(model) and st is not None and st.desired is not None

    def _done(self, model: str, _task: object) -> None:
        self._pending.pop(model, None)

    async def _load(self, model: str) -> Refusal | None:
        wait = self.settings.load_wait_s
        try:
            await asyncio.wait_for(self._slots.acquire(), wait)
        except asyncio.TimeoutError:
            n = self.settings.max_loads
            return Refusal(
                f"{model} cannot be loaded now: {n} loads ({ENV_MAX_LOADS}={n}) have been "
                f"running for over {wait:g}s ({ENV_LOAD_WAIT}); retry later",
                503,
            )
        try:
            if "@" in model:
                return await self._load_version(model)
            return await self._load_name(model)
        finally:
            self._slots.release()

    async def _load_name(self, name: str) -> Refusal | None:
        async with self.served.name_lock(name):
            st = self.statuses.get(name)
            if self.served.is_loaded(name) or not self.is_lazy(name) or st is None:
                return None
            version = st.desired
            if version is None:
                return None
            key = await asyncio.to_thread(self.served.key, name, version)
            failure = self.failures.blocking((name, version, key))
            if failure is not None:
                return failure.refusal(name)
            self.active[name] = None
            if not await self.served.swap(st, version, key, None, bounded=True):
                self.active.pop(name, None)
                failure = self.failures.get((name, version, key))
                return failure.refusal(name) if failure is not None else None
        await self.evict_lazy()
        return None

    async def _load_version(self, model: str) -> Refusal | None:
        parsed = split_model(model)
        if parsed is None:
            return None
        name, version = parsed
        try:
            key, allowed = await asyncio.to_thread(self._version_facts, name, version)
        except Exception:
            logger.exception("agent_finetune: checking pinned %s failed", model)
            return None
        if key is None:
            return None  # no such version: vLLM answers 404
        failure = self.failures.blocking((name, version, key))
        if failure is not None:
            return failure.refusal(model)
        if not allowed:
            return Refusal(
                f"{model}: only versions that were current may be pinned on this server "
                f"({ENV_PINS}=current); promote it first or set {ENV_PINS}=any"
            )
        if self.settings.max_pinned == 0:
            return Refusal(f"{model}: pinned versions are disabled ({ENV_MAX_PINNED}=0)")
        if self.served.is_loaded(model):
            return None
        try:
            copy = await self.served.load(name, version, bounded=True)
        except Exception as e:
            if not isinstance(e, (AgentFinetuneError, OSError)):
                logger.exception("agent_finetune: pinned load of %s failed", model)
            return self.failures.record((name, version, key), e).refusal(model)
        self.failures.clear((name, version, key))
        self.served.keep(self.served.served_name(copy))
        await self.served.evict()
        return None

    def _version_facts(self, name: str, version: str) -> tuple[str | None, bool]:
        """(manifest key or None when the version does not exist, whether it may be
        pinned). Blocking file IO on a miss."""
        if not self.catalog.has_version(name, version):
            return None, True
        key = self.served.key(name, version)
        if key is None or self.settings.pins == "any":
            return key, True
        if self.served.registry.current(name) == version:
            return key, True
        # Versions `current` really pointed at: history's pointer moves, not a refused
        # gate or a canary's start (they name a version they did not make current).
        history = self.served.registry.history(name)
        return key, version in {e.get("to") for e in history if e.get("action") in POINTER_MOVES}

    async def evict_lazy(self) -> None:
        """Unload the least recently used lazy names beyond ``lazy_capacity`` (none that
        is busy or that a request in flight holds)."""
        while len(self.active) > self.lazy_capacity:
            victim = next((n for n in self.active if self._evictable(n)), None)
            if victim is None:
                return  # every one is busy or in use: the next load evicts
            async with self.served.name_lock(victim):
                self.active.pop(victim, None)
                served = self.served.routes.get(victim)
                if served is not None:
                    await self.served.unload(served)
                st = self.statuses.get(victim)
                if st is not None and st.state == "live":
                    st.state = "lazy"
                    st.unserved()
                logger.info("agent_finetune: unloaded lazy %s (least recently used)", victim)

    def _evictable(self, name: str) -> bool:
        served = self.served.routes.get(name, name)
        return not self.served.name_lock(name).locked() and not self.served.leased(served)
