"""The reconcile loop: make what a server serves match what the registry says.

Desired state: for each adapter name in the registry, the version ``current`` points to.
Served state: the names this reconciler loaded through its ``Transport``. Each pass is
level-triggered and idempotent; filesystem events only wake the loop early.

A swap loads the version under its own name ``<name>@vNNNN`` from a verified cache copy,
then repoints ``<name>`` at it in one step (never an in-place reload: requests already
running finish on the version they started on). Replaced and pinned versions stay loaded
in a bounded LRU, so a rollback to a recent version is only a repoint.

No vLLM import here: the plugin (in-process) and the sidecar (over HTTP) share this code
and differ only in their transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from agent_finetune.errors import AgentFinetuneError, ValidationError
from agent_finetune.registry import CURRENT, MANIFEST, Registry
from agent_finetune.registry.names import split_model, utc_now, version_number
from server_plugin import metrics
from server_plugin.cache import AdapterCache

logger = logging.getLogger(__name__)

State = Literal["pending", "loading", "live", "failed"]


# Bad adapters and refusals: reported without a traceback. Anything else is a bug.
_EXPECTED = AgentFinetuneError


class Transport(Protocol):
    """How the reconciler changes what a server serves."""

    async def load(self, served_name: str, path: str) -> None:
        """Load the adapter at ``path`` under ``served_name``; raise LoadError on refusal."""
        ...

    async def repoint(self, name: str, target: str) -> None:
        """Make ``name`` serve exactly what the loaded ``target`` serves, in one step."""
        ...

    async def unload(self, served_name: str) -> None:
        """Stop serving ``served_name`` (unknown names are ignored)."""
        ...


@dataclass
class AdapterStatus:
    """What ``GET /v1/adapters`` reports for one adapter name."""

    name: str
    desired: str | None = None
    live: str | None = None
    state: State = "pending"
    error: str | None = None
    error_version: str | None = None
    loaded_at: str | None = None
    load_seconds: float | None = None
    swap_seconds: float | None = None
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError) and exc.problems:
        return "; ".join(exc.problems)
    return f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)


class Reconciler:
    """Drive a ``Transport`` until it serves each registry name's current version."""

    def __init__(
        self,
        registry: Registry,
        cache: AdapterCache,
        transport: Transport,
        *,
        resync_s: float = 2.0,
        max_pinned: int = 4,
        cache_grace_s: float = 600.0,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.transport = transport
        self.resync_s = resync_s
        self.max_pinned = max_pinned
        self.cache_grace_s = cache_grace_s
        self._status: dict[str, AdapterStatus] = {}
        self._loaded: dict[str, Path] = {}  # versioned name -> cache copy it serves
        self._points: dict[str, str] = {}  # public name -> versioned name it serves
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded, not pointed at
        self._failed: dict[tuple[str, str], tuple[int, int] | None] = {}
        self._pinned_errors: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self.last_sync: str | None = None
        self.sync_error: str | None = None
        self.passes = 0
        self._started = time.time()

    # -- loop ---------------------------------------------------------------------------
    async def run(self, before_pass: Callable[[], object] | None = None) -> None:
        """Reconcile now, then whenever woken or every ``resync_s`` seconds, until stop().

        ``before_pass`` runs before each pass (e.g. to (re)start a filesystem watcher).
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not self._stopping:
            if before_pass is not None:
                try:
                    before_pass()
                except Exception:
                    logger.exception("agent_finetune: before_pass hook failed")
            await self.reconcile_once()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.resync_s)
            self._wake.clear()

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
        try:
            desired = await asyncio.to_thread(self._read_desired)
        except Exception as e:
            self.sync_error = f"cannot read registry {self.registry.root}: {_describe(e)}"
            logger.exception("agent_finetune: %s", self.sync_error)
            return
        self.sync_error = (
            None
            if desired is not None
            else (
                f"registry folder {self.registry.root} is missing or unreadable; "
                "keeping every adapter as it is"
            )
        )
        for name, (version, moved_at) in sorted((desired or {}).items()):
            try:
                await self._reconcile_name(name, version, moved_at)
            except Exception as e:  # a bug, not a bad adapter: log it, keep the others going
                logger.exception("agent_finetune: reconciling %r failed", name)
                st = self._status.setdefault(name, AdapterStatus(name))
                st.error, st.error_version = _describe(e), version
        if desired is not None:
            for name in sorted(set(self._status) | set(self._points)):
                if name not in desired:
                    try:
                        await self._remove(name)
                    except Exception:
                        logger.exception("agent_finetune: removing %r failed", name)
        try:
            in_use = set(self._loaded.values())
            await asyncio.to_thread(self.cache.collect, self.cache_grace_s, in_use)
        except Exception:
            logger.exception("agent_finetune: cleaning the cache failed")
        self.last_sync = utc_now()
        self.passes += 1

    def _read_desired(self) -> dict[str, tuple[str | None, float | None]] | None:
        """name -> (current version, pointer mtime); None if the registry folder is gone."""
        if not self.registry.root.is_dir():
            return None
        out: dict[str, tuple[str | None, float | None]] = {}
        for name in self.registry.names():
            try:
                version = self.registry.current(name)
                moved_at = (self.registry.name_dir(name) / CURRENT).stat().st_mtime
            except (OSError, ValueError):
                version, moved_at = None, None
            out[name] = (version, moved_at)
        return out

    def _fingerprint(self, name: str, version: str) -> tuple[int, int] | None:
        try:
            st = (self.registry.version_dir(name, version) / MANIFEST).stat()
        except (OSError, ValueError):
            return None
        return (st.st_mtime_ns, st.st_size)

    async def _reconcile_name(self, name: str, version: str | None, moved_at: float | None) -> None:
        st = self._status.setdefault(name, AdapterStatus(name))
        st.desired = version
        if version is None:
            st.state = "failed" if st.live is None else "live"
            st.error = (
                f"{self.registry.name_dir(name) / CURRENT}: missing or unreadable; "
                "run `agent-finetune promote` or `rollback` to set it"
            )
            st.error_version = None
            return
        if st.live == version:
            st.state = "live"
            return
        key = (name, version)
        if key in self._failed:
            fingerprint = await asyncio.to_thread(self._fingerprint, name, version)
            if self._failed[key] == fingerprint:
                return  # already rejected; retried only when its manifest changes
            del self._failed[key]
        async with self._lock:
            await self._swap(st, version, moved_at)

    # -- swaps ----------------------------------------------------------------------------
    async def _ensure_loaded(self, name: str, version: str) -> Path:
        vname = f"{name}@{version}"
        path = self._loaded.get(vname)
        if path is None:
            t0 = time.monotonic()
            path = await asyncio.to_thread(self.cache.prepare, self.registry, name, version)
            await self.transport.load(vname, str(path))
            self._loaded[vname] = path
            metrics.LOADS.labels(name).inc()
            metrics.LOAD_SECONDS.observe(time.monotonic() - t0)
            logger.info("agent_finetune: loaded %s from %s", vname, path)
        return path

    async def _swap(self, st: AdapterStatus, version: str, moved_at: float | None) -> None:
        name, vname = st.name, f"{st.name}@{version}"
        st.state = "loading"
        t0 = time.monotonic()
        try:
            path = await self._ensure_loaded(name, version)
            load_s = time.monotonic() - t0
            await self.transport.repoint(name, vname)
        except Exception as e:
            st.state, st.error, st.error_version = "failed", _describe(e), version
            self._failed[(name, version)] = await asyncio.to_thread(
                self._fingerprint, name, version
            )
            metrics.FAILURES.labels(name).inc()
            if isinstance(e, _EXPECTED):
                logger.warning(
                    "agent_finetune: %s rejected, %s keeps serving %s: %s",
                    vname,
                    name,
                    st.live,
                    st.error,
                )
            else:
                logger.exception("agent_finetune: %s failed", vname)
            if vname in self._loaded and self._points.get(name) != vname:
                self._lru[vname] = None
                await self._evict()
            return
        old = self._points.get(name)
        self._points[name] = vname
        self._lru.pop(vname, None)
        if old is not None and old != vname:
            self._lru[old] = None
        st.live, st.state, st.path = version, "live", str(path)
        if st.error_version == version or st.error_version is None:
            st.error, st.error_version = None, None
        st.loaded_at = utc_now()
        st.load_seconds = round(load_s, 6)
        # Pointer moves from before this process started are start-up loads, not swaps.
        if moved_at is not None and moved_at >= self._started:
            st.swap_seconds = round(time.time() - moved_at, 6)
            metrics.SWAP_SECONDS.observe(max(0.0, st.swap_seconds))
        else:
            st.swap_seconds = None
        metrics.SWAPS.labels(name).inc()
        metrics.LIVE_VERSION.labels(name).set(version_number(version))
        logger.info("agent_finetune: %s now serves %s (was %s)", name, version, old)
        await self._evict()

    async def _evict(self) -> None:
        while len(self._lru) > self.max_pinned:
            vname, _ = self._lru.popitem(last=False)
            await self._unload(vname)
        metrics.PINNED.set(len(self._lru))

    async def _unload(self, served_name: str) -> None:
        try:
            await self.transport.unload(served_name)
        except Exception:
            logger.exception("agent_finetune: unloading %s failed", served_name)
        path = self._loaded.pop(served_name, None)
        if path is not None and path not in self._loaded.values():
            self.cache.release(path)

    async def _remove(self, name: str) -> None:
        """The name's folder left the registry: stop serving it and its versions."""
        async with self._lock:
            if self._points.pop(name, None) is not None:
                try:
                    await self.transport.unload(name)
                except Exception:
                    logger.exception("agent_finetune: unloading %s failed", name)
            for vname in [v for v in self._loaded if v.partition("@")[0] == name]:
                self._lru.pop(vname, None)
                await self._unload(vname)
            self._status.pop(name, None)
            for key in [k for k in self._failed if k[0] == name]:
                del self._failed[key]
            metrics.LIVE_VERSION.labels(name).set(0)
            metrics.PINNED.set(len(self._lru))
            logger.info("agent_finetune: %s left the registry; no longer served", name)

    # -- pinned requests ------------------------------------------------------------------
    def is_loaded(self, served_name: str) -> bool:
        return served_name in self._loaded or served_name in self._points

    async def ensure_pinned(self, model: str) -> str | None:
        """Load ``name@vNNNN`` if it exists and is not loaded; return an error text or None.

        None also when the version does not exist: the server then answers 404 itself.
        """
        parsed = split_model(model)
        if parsed is None:
            return None
        if model in self._loaded:
            if model in self._lru:
                self._lru.move_to_end(model)
            return None
        name, version = parsed
        async with self._lock:
            if model in self._loaded:
                return None
            try:
                exists = await asyncio.to_thread(lambda: version in self.registry.versions(name))
            except Exception:
                return None
            if not exists:
                return None
            if self.max_pinned == 0:
                return f"{model}: pinned versions are disabled (AGENT_FINETUNE_MAX_PINNED=0)"
            try:
                await self._ensure_loaded(name, version)
            except Exception as e:
                msg = f"{model} cannot be served: {_describe(e)}"
                self._pinned_errors[model] = msg
                metrics.FAILURES.labels(name).inc()
                if not isinstance(e, _EXPECTED):
                    logger.exception("agent_finetune: pinned load of %s failed", model)
                return msg
            self._pinned_errors.pop(model, None)
            if self._points.get(name) != model:
                self._lru[model] = None
            await self._evict()
        return None

    # -- reporting ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The state ``GET /v1/adapters`` returns."""
        return {
            "object": "list",
            "registry": str(self.registry.root),
            "cache_dir": str(self.cache.root),
            "last_sync": self.last_sync,
            "sync_error": self.sync_error,
            "data": [self._status[n].as_dict() for n in sorted(self._status)],
            "pinned": [
                {"model": v, "path": str(self._loaded[v])} for v in self._lru if v in self._loaded
            ],
            "pinned_errors": dict(self._pinned_errors),
            "max_pinned": self.max_pinned,
            "pid": os.getpid(),
        }
