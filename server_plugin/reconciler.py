"""The reconcile loop: make what a server serves match what the registry says.

Desired state: for each adapter name in the registry, the version ``current`` points to and
the sha256 of its manifest (its content). Actual state: what the server really serves,
read from its ``Transport`` at the start of every pass (vLLM's LoRA table in-process,
``GET /v1/models`` for the sidecar), so a lost load or a restarted server heals itself.
Each pass is level-triggered and idempotent; filesystem events only wake the loop early.

A swap loads the version under its own name ``<name>@vNNNN`` from a verified cache copy,
then repoints ``<name>`` at it in one step (never an in-place reload: requests already
running finish on the version they started on). Replaced and pinned versions stay loaded
in a bounded LRU, so a rollback to a recent version is only a repoint. Loads are keyed by
content: a version number whose files changed loads as ``<name>@vNNNN+<key>`` and
``<name>@vNNNN`` is repointed to it.

Failures have kinds. Permanent ones (validation, a 4xx refusal) are remembered per
(name, version, manifest sha256) until ``current`` moves; transient ones (I/O, 5xx,
timeouts: ``OSError``) are retried with capped exponential backoff and jitter. Every pass
writes every name's status, so it is never staler than one pass.

Absence is not deletion: a registry root without its marker file, empty or unreadable is
"unavailable" (serve what is loaded, unload nothing); a name is unloaded only after it has
been absent for ``unload_after`` passes, at most ``max_removals`` names per pass.

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
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

from agent_finetune.errors import AgentFinetuneError, ValidationError
from agent_finetune.registry import CURRENT, MANIFEST, Registry
from agent_finetune.registry.names import split_model, utc_now, version_number
from agent_finetune.registry.store import MARKER
from server_plugin import metrics
from server_plugin.cache import AdapterCache, manifest_key

logger = logging.getLogger(__name__)

State = Literal["pending", "loading", "live", "failed", "retrying"]
FailureKind = Literal["permanent", "transient"]


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


def failure_kind(exc: BaseException) -> FailureKind:
    """Transient: I/O and server unavailability (``OSError``, timeouts). Permanent: the
    adapter or the server's refusal of it (validation, 4xx). A bug counts as transient:
    retrying it with backoff is cheap and it may be a race."""
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return "transient"
    if isinstance(exc, AgentFinetuneError):
        return "permanent"
    return "transient"


@dataclass
class AdapterStatus:
    """What ``GET /v1/adapters`` reports for one adapter name."""

    name: str
    desired: str | None = None
    live: str | None = None
    state: State = "pending"
    error: str | None = None
    error_version: str | None = None
    error_kind: FailureKind | None = None
    attempts: int = 0
    next_retry: str | None = None
    absent_passes: int = 0
    sha256: str | None = None
    loaded_at: str | None = None
    load_seconds: float | None = None
    swap_seconds: float | None = None
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PinRefusal:
    """Why a pinned ``name@vNNNN`` cannot be served: ``status`` 400 (permanent) or 503."""

    message: str
    status: int = 400


@dataclass
class _Failure:
    kind: FailureKind
    error: str
    attempts: int = 1
    next_try: float = 0.0  # monotonic


@dataclass(frozen=True)
class _Copy:
    """One adapter loaded into the server under its own served name."""

    name: str
    version: str
    key: str
    path: Path


@dataclass
class _Desired:
    available: bool
    reason: str | None = None
    names: dict[str, tuple[str | None, str | None, float | None]] = field(default_factory=dict)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError) and exc.problems:
        return "; ".join(exc.problems)
    return f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)


def _utc_in(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, timezone.utc).isoformat(
        timespec="milliseconds"
    )


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
        retry_base_s: float = 0.5,
        retry_max_s: float = 10.0,
        unload_after: int = 3,
        max_removals: int = 16,
        pins: str = "any",
        max_loads: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.transport = transport
        self.resync_s = resync_s
        self.max_pinned = max_pinned
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.unload_after = unload_after
        self.max_removals = max_removals
        self.pins = pins
        self._rng = rng or random.Random()
        self._status: dict[str, AdapterStatus] = {}
        self._loaded: dict[str, _Copy] = {}  # served name -> the copy it serves
        self._content: dict[tuple[str, str, str], str] = {}  # (name, version, key) -> served
        self._points: dict[str, str] = {}  # alias (name, or name@vN of a +key copy) -> served
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded, no public name on it
        self._failures: dict[tuple[str, str, str | None], _Failure] = {}
        self._desired_seen: dict[str, tuple[str | None, str | None]] = {}
        self._absent: dict[str, int] = {}
        self._rejected_pins: dict[tuple[str, str, str | None], str] = {}
        self._unknown_pins: dict[str, float] = {}  # model -> monotonic expiry
        self._pin_errors: dict[str, str] = {}
        self._keys: dict[Path, tuple[tuple[int, int, int], str]] = {}  # manifest stat memo
        self._version_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._name_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._load_slots = asyncio.Semaphore(max_loads)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self.last_sync: str | None = None
        self.sync_error: str | None = None
        self.registry_available: bool | None = None
        self.server_error: str | None = None
        self.passes = 0
        self._started = time.time()
        # What the server serves: read once per pass, then kept current by our own changes.
        self._actual: dict[str, str] | None = None
        self._ever_served: set[Path] = set()  # paths the server held while it was unreachable
        cache.in_use = self._in_use

    # -- loop ---------------------------------------------------------------------------
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
            if before_pass is not None:
                try:
                    before_pass()
                except Exception:
                    logger.exception("agent_finetune: before_pass hook failed")
            await self.reconcile_once()
            if after_pass is not None:
                try:
                    after_pass()
                except Exception:
                    logger.exception("agent_finetune: after_pass hook failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        due = [f.next_try for f in self._failures.values() if f.kind == "transient"]
        wait = self.resync_s
        if due:
            wait = min(wait, max(0.05, min(due) - time.monotonic()))
        return wait

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
        self._unknown_pins.clear()  # a pass is also how a new version becomes pinnable
        try:
            desired = await asyncio.to_thread(self._read_desired)
        except Exception as e:
            desired = _Desired(False, f"cannot read registry {self.registry.root}: {_describe(e)}")
            logger.exception("agent_finetune: %s", desired.reason)
        self.registry_available = desired.available
        self.sync_error = desired.reason
        metrics.REGISTRY_AVAILABLE.set(1 if desired.available else 0)
        self._actual = await self._read_actual()
        if self._actual is not None:
            self._forget_lost(self._actual)
            if desired.available:
                await self._reconcile_names(desired, self._actual)
                await self._remove_absent(desired)
                await self._drop_stale_pins()
        self._report(self._actual)
        try:
            await asyncio.to_thread(self.cache.collect)
        except Exception:
            logger.exception("agent_finetune: cleaning the cache failed")
        self.last_sync = utc_now()
        self.passes += 1

    async def _reconcile_names(self, desired: _Desired, actual: dict[str, str]) -> None:
        for name, (version, key, moved_at) in sorted(desired.names.items()):
            self._absent.pop(name, None)
            try:
                async with self._name_locks[name]:
                    await self._reconcile_name(name, version, key, moved_at, actual)
            except Exception as e:  # a bug, not a bad adapter: log it, keep the others going
                logger.exception("agent_finetune: reconciling %r failed", name)
                st = self._status.setdefault(name, AdapterStatus(name))
                st.error, st.error_version, st.error_kind = _describe(e), version, "transient"

    def _in_use(self) -> set[Path]:
        """Copies the server may re-read: our loads and whatever it serves (or, while it
        cannot be asked, whatever it served when last asked)."""
        paths = {c.path for c in self._loaded.values()}
        paths |= {Path(p) for p in (self._actual or {}).values()}
        return paths | self._ever_served

    async def _read_actual(self) -> dict[str, str] | None:
        try:
            actual = await self.transport.served()
        except Exception as e:
            self.server_error = f"cannot read what the server serves: {_describe(e)}"
            logger.warning("agent_finetune: %s", self.server_error)
            if self._actual is not None:
                self._ever_served = {Path(p) for p in self._actual.values()}
            return None
        self.server_error = None
        self._ever_served = set()
        return actual

    def _forget_lost(self, actual: dict[str, str]) -> None:
        """Loads the server no longer has (restarted, unloaded by hand) are forgotten, so
        this pass loads them again."""
        for served, copy in list(self._loaded.items()):
            if actual.get(served) != str(copy.path):
                logger.warning("agent_finetune: the server lost %s; loading it again", served)
                self._drop_copy(served)
        for alias, served in list(self._points.items()):
            if served not in self._loaded:
                del self._points[alias]

    def _drop_copy(self, served: str) -> None:
        copy = self._loaded.pop(served, None)
        self._lru.pop(served, None)
        if copy is None:
            return
        if self._content.get((copy.name, copy.version, copy.key)) == served:
            del self._content[(copy.name, copy.version, copy.key)]
        if copy.path not in {c.path for c in self._loaded.values()}:
            self.cache.release(copy.path)

    # -- desired state --------------------------------------------------------------------
    def _read_desired(self) -> _Desired:
        """name -> (current version, manifest key, pointer mtime), or "unavailable"."""
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
        for name in self.registry.names():
            version: str | None
            try:
                version = self.registry.current(name)
                moved_at = (self.registry.name_dir(name) / CURRENT).stat().st_mtime
            except (OSError, ValueError):
                version, moved_at = None, None
            key = self._key(name, version) if version is not None else None
            out.names[name] = (version, key, moved_at)
        return out

    def _key(self, name: str, version: str) -> str | None:
        """The manifest's content key, re-read only when its stat changes; None if absent."""
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

    # -- one name ---------------------------------------------------------------------------
    async def _reconcile_name(
        self,
        name: str,
        version: str | None,
        key: str | None,
        moved_at: float | None,
        actual: dict[str, str],
    ) -> None:
        st = self._status.setdefault(name, AdapterStatus(name))
        st.desired, st.absent_passes = version, 0
        if self._desired_seen.get(name) != (version, key):
            # `current` moved (or its content changed): forget what failed before.
            self._desired_seen[name] = (version, key)
            for k in [k for k in self._failures if k[0] == name]:
                del self._failures[k]
        if version is None:
            st.state = "live" if self._serving_version(name, actual) else "failed"
            st.error = (
                f"{self.registry.name_dir(name) / CURRENT}: missing or unreadable; "
                "run `agent-finetune promote` or `rollback` to set it"
            )
            st.error_version, st.error_kind = None, "permanent"
            return
        fkey = (name, version, key)
        serving = self._serving_version(name, actual)
        if key is None and serving is not None and serving.version == version:
            # The version's folder left the registry (or its manifest is unreadable): the
            # verified copy keeps serving; nothing to load.
            st.state, st.attempts, st.next_retry = "live", 0, None
            st.error = (
                f"{self.registry.version_dir(name, version)}: missing or unreadable in the "
                "registry; serving the server's verified copy"
            )
            st.error_version, st.error_kind = version, "transient"
            return
        if self._is_serving(name, version, key, actual):
            self._failures.pop(fkey, None)
            st.state, st.attempts, st.next_retry = "live", 0, None
            st.error = st.error_version = st.error_kind = None  # older versions' too
            return
        failure = self._failures.get(fkey)
        if failure is not None and (
            failure.kind == "permanent" or time.monotonic() < failure.next_try
        ):
            self._show_failure(st, version, failure)
            return
        await self._swap(st, version, key, moved_at, failure)

    def _is_serving(self, name: str, version: str, key: str | None, actual: dict[str, str]) -> bool:
        if key is None:
            return False
        served = self._content.get((name, version, key))
        if served is None or self._points.get(name) != served:
            return False
        return actual.get(name) == str(self._loaded[served].path)

    def _serving_version(self, name: str, actual: dict[str, str]) -> _Copy | None:
        """The copy the server really serves under ``name`` (None when none of ours)."""
        path = actual.get(name)
        if path is None:
            return None
        for copy in self._loaded.values():
            if str(copy.path) == path and copy.name == name:
                return copy
        return None

    def _show_failure(self, st: AdapterStatus, version: str, failure: _Failure) -> None:
        st.state = "failed" if failure.kind == "permanent" else "retrying"
        st.error, st.error_version, st.error_kind = failure.error, version, failure.kind
        st.attempts = failure.attempts
        st.next_retry = (
            _utc_in(max(0.0, failure.next_try - time.monotonic()))
            if failure.kind == "transient"
            else None
        )

    def _record_failure(
        self, fkey: tuple[str, str, str | None], exc: BaseException, previous: _Failure | None
    ) -> _Failure:
        kind = failure_kind(exc)
        attempts = (previous.attempts + 1) if previous is not None else 1
        failure = _Failure(kind, _describe(exc), attempts)
        if kind == "transient":
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
            failure.next_try = time.monotonic() + delay * (0.5 + self._rng.random() / 2)
        self._failures[fkey] = failure
        metrics.FAILURES.labels(fkey[0], kind).inc()
        return failure

    # -- transport calls, mirrored into what we know the server serves ---------------------
    async def _load(self, served: str, path: str) -> None:
        await self.transport.load(served, path)
        if self._actual is not None:
            self._actual[served] = path

    async def _repoint(self, alias: str, served: str) -> None:
        await self.transport.repoint(alias, served)
        if self._actual is not None:
            self._actual[alias] = str(self._loaded[served].path)

    async def _unload_name(self, name: str) -> None:
        if self._actual is not None:
            self._actual.pop(name, None)
        await self.transport.unload(name)

    # -- swaps ----------------------------------------------------------------------------
    def _served_name_for(self, name: str, version: str, key: str) -> str:
        vname = f"{name}@{version}"
        taken = self._loaded.get(vname)
        if (taken is None or taken.key == key) and vname not in self._points:
            return vname
        return f"{vname}+{key[:8]}"

    async def _ensure_loaded(self, name: str, version: str, *, bounded: bool = False) -> _Copy:
        """Load ``name@version``'s current content (once, however many callers wait)."""
        vname = f"{name}@{version}"
        async with self._version_locks[vname]:
            path, key = await asyncio.to_thread(
                self.cache.prepare, self.registry, name, version, bounded=bounded
            )
            served = self._content.get((name, version, key))
            if served is not None and served in self._loaded:
                return self._loaded[served]
            t0 = time.monotonic()
            served = self._served_name_for(name, version, key)
            await self._load(served, str(path))
            copy = _Copy(name, version, key, path)
            self._loaded[served] = copy
            self._content[(name, version, key)] = served
            if served != vname:
                # The version's content changed (a reused number): `name@vN` answers with
                # the new content from now on; the old copy is no longer addressable.
                displaced = vname in self._loaded  # the old content, under its own name
                await self._repoint(vname, served)
                self._points[vname] = served
                if displaced:  # no longer addressable; a name still on it is swapped next
                    self._drop_copy(vname)
            metrics.LOADS.labels(name).inc()
            metrics.LOAD_SECONDS.observe(time.monotonic() - t0)
            logger.info("agent_finetune: loaded %s from %s", served, path)
            return copy

    async def _swap(
        self,
        st: AdapterStatus,
        version: str,
        key: str | None,
        moved_at: float | None,
        previous: _Failure | None,
    ) -> None:
        name, fkey = st.name, (st.name, version, key)
        st.state = "loading"
        t0 = time.monotonic()
        try:
            copy = await self._ensure_loaded(name, version)
            load_s = time.monotonic() - t0
            served = self._content[(name, version, copy.key)]
            await self._repoint(name, served)
        except Exception as e:
            failure = self._record_failure(fkey, e, previous)
            self._show_failure(st, version, failure)
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
            await self._evict()
            return
        self._failures.pop(fkey, None)
        old = self._points.get(name)
        self._points[name] = served
        self._lru.pop(served, None)
        if old is not None and old != served and old in self._loaded:
            self._lru[old] = None
        st.state, st.attempts, st.next_retry = "live", 0, None
        st.error = st.error_version = st.error_kind = None
        # Serving it from this moment: say so now, not at the end of the pass.
        st.live, st.path, st.sha256 = version, str(copy.path), copy.key
        st.loaded_at = utc_now()
        st.load_seconds = round(load_s, 6)
        # Pointer moves from before this process started are start-up loads, not swaps.
        if moved_at is not None and moved_at >= self._started:
            st.swap_seconds = round(time.time() - moved_at, 6)
            metrics.SWAP_SECONDS.observe(max(0.0, st.swap_seconds))
        else:
            st.swap_seconds = None
        metrics.SWAPS.labels(name).inc()
        logger.info("agent_finetune: %s now serves %s (was %s)", name, served, old)
        await self._evict()

    async def _evict(self) -> None:
        while len(self._lru) > self.max_pinned:
            served, _ = self._lru.popitem(last=False)
            await self._unload(served)
        metrics.PINNED.set(len(self._lru))

    async def _unload(self, served: str) -> None:
        aliases = [a for a, s in self._points.items() if s == served]
        for name in [*aliases, served]:
            try:
                await self._unload_name(name)
            except Exception:
                logger.exception("agent_finetune: unloading %s failed", name)
            self._points.pop(name, None)
        self._drop_copy(served)

    async def _remove_absent(self, desired: _Desired) -> None:
        """Unload names absent for ``unload_after`` passes, at most ``max_removals`` now."""
        gone = sorted(n for n in set(self._status) | set(self._points) if "@" not in n)
        gone = [n for n in gone if n not in desired.names]
        removed = 0
        for name in gone:
            count = self._absent[name] = self._absent.get(name, 0) + 1
            st = self._status.get(name)
            if st is not None:
                st.absent_passes = count
            if count < self.unload_after or removed >= self.max_removals:
                if st is not None:
                    st.error = (
                        f"{name} is not in the registry ({count} pass(es)); unloaded after "
                        f"{self.unload_after} (AGENT_FINETUNE_UNLOAD_AFTER)"
                    )
                continue
            removed += 1
            try:
                await self._remove(name)
            except Exception:
                logger.exception("agent_finetune: removing %r failed", name)

    async def _remove(self, name: str) -> None:
        """The name's folder left the registry: stop serving it and its versions."""
        async with self._name_locks[name]:
            if self._points.pop(name, None) is not None:
                try:
                    await self._unload_name(name)
                except Exception:
                    logger.exception("agent_finetune: unloading %s failed", name)
            for served in [s for s, c in self._loaded.items() if c.name == name]:
                await self._unload(served)
            self._status.pop(name, None)
            self._absent.pop(name, None)
            self._desired_seen.pop(name, None)
            for key in [k for k in self._failures if k[0] == name]:
                del self._failures[key]
            metrics.LIVE_VERSION.labels(name).set(0)
            metrics.PINNED.set(len(self._lru))
            logger.info("agent_finetune: %s left the registry; no longer served", name)

    async def _drop_stale_pins(self) -> None:
        """A pinned version whose registry content changed is unloaded; its next request
        loads the new content (the live name is handled by its own swap)."""
        for served in list(self._lru):
            copy = self._loaded.get(served)
            if copy is None:
                continue
            key = await asyncio.to_thread(self._key, copy.name, copy.version)
            if key is not None and key != copy.key:
                logger.info("agent_finetune: %s changed in the registry; unloading", served)
                self._lru.pop(served, None)
                await self._unload(served)

    # -- pinned requests ------------------------------------------------------------------
    def is_loaded(self, served_name: str) -> bool:
        return served_name in self._loaded or served_name in self._points

    async def ensure_pinned(self, model: str) -> PinRefusal | None:
        """Load ``name@vNNNN`` if it exists and is not loaded; return why not, or None.

        None also when the version does not exist: the server then answers 404 itself.
        Unknown versions are remembered for one resync interval, refused ones until their
        content changes; at most ``max_loads`` loads run at once; nothing here waits on
        the reconcile loop.
        """
        parsed = split_model(model)
        if parsed is None:
            return None
        if self.is_loaded(model):
            if model in self._lru:
                self._lru.move_to_end(model)
            return None
        expiry = self._unknown_pins.get(model)
        if expiry is not None and time.monotonic() < expiry:
            return None
        name, version = parsed
        try:
            key, allowed = await asyncio.to_thread(self._pin_facts, name, version)
        except Exception:
            logger.exception("agent_finetune: checking pinned %s failed", model)
            return None
        if key is None:
            self._unknown_pins[model] = time.monotonic() + self.resync_s
            return None
        rejected = self._rejected_pins.get((name, version, key))
        if rejected is not None:
            return PinRefusal(rejected)
        if not allowed:
            return PinRefusal(
                f"{model}: only versions that were ever current may be pinned on this server "
                "(AGENT_FINETUNE_PINS=current); promote it first or set AGENT_FINETUNE_PINS=any"
            )
        if self.max_pinned == 0:
            return PinRefusal(
                f"{model}: pinned versions are disabled (AGENT_FINETUNE_MAX_PINNED=0)"
            )
        async with self._load_slots:
            if self.is_loaded(model):
                return None
            try:
                copy = await self._ensure_loaded(name, version, bounded=True)
            except Exception as e:
                msg = f"{model} cannot be served: {_describe(e)}"
                self._pin_errors[model] = msg
                kind = failure_kind(e)
                metrics.FAILURES.labels(name, kind).inc()
                if kind == "permanent":
                    self._rejected_pins[(name, version, key)] = msg
                    return PinRefusal(msg)
                if not isinstance(e, OSError):
                    logger.exception("agent_finetune: pinned load of %s failed", model)
                return PinRefusal(msg + " (temporary; retry later)", 503)
        self._pin_errors.pop(model, None)
        served = self._content[(name, version, copy.key)]
        if self._points.get(name) != served:
            self._lru[served] = None
        await self._evict()
        return None

    def _pin_facts(self, name: str, version: str) -> tuple[str | None, bool]:
        """(manifest key or None when the version does not exist, whether pinning is allowed)."""
        key = self._key(name, version)
        if key is None or self.pins == "any":
            return key, True
        if self.registry.current(name) == version:
            return key, True
        # Pointer moves of the history (a "publish" entry records a version, not a move).
        ever = {e.get("to") for e in self.registry.history(name) if e.get("action") != "publish"}
        return key, version in ever

    # -- reporting ------------------------------------------------------------------------
    def _report(self, actual: dict[str, str] | None) -> None:
        """Write every name's live version from what the server really serves."""
        for name, st in self._status.items():
            if actual is None:
                st.live, st.path, st.sha256 = None, None, None
                if st.state == "live":
                    st.state = "retrying"
                st.error = self.server_error
                metrics.LIVE_VERSION.labels(name).set(0)
                continue
            copy = self._serving_version(name, actual)
            st.live = copy.version if copy is not None else None
            st.path = str(copy.path) if copy is not None else None
            st.sha256 = copy.key if copy is not None else None
            if st.state == "live" and (copy is None or copy.version != st.desired):
                st.state = "pending"
            metrics.LIVE_VERSION.labels(name).set(
                version_number(copy.version) if copy is not None else 0
            )
        metrics.PINNED.set(len(self._lru))

    def status(self) -> dict[str, Any]:
        """The state ``GET /v1/adapters`` returns."""
        return {
            "object": "list",
            "registry": str(self.registry.root),
            "registry_available": self.registry_available,
            "cache_dir": str(self.cache.root),
            "cache_bytes": self.cache.bytes,
            "last_sync": self.last_sync,
            "sync_error": self.sync_error,
            "server_error": self.server_error,
            "data": [self._status[n].as_dict() for n in sorted(self._status)],
            "pinned": [
                {"model": s, "path": str(self._loaded[s].path)}
                for s in self._lru
                if s in self._loaded
            ],
            "pinned_errors": dict(self._pin_errors),
            "max_pinned": self.max_pinned,
            "pid": os.getpid(),
        }
