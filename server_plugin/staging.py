"""Versions loaded ahead of going live, so a promote or a rollback is only a repoint.

For each name the server serves (preloaded, or a lazy name a request loaded), the versions
that may go live next are:

- ``canary``: the candidate of a running canary (its requests are routed to it);
- ``next``: the newest published version above ``current`` (published, not promoted yet:
  what the eval gate or an operator promotes next);
- ``rollback``: the version ``current`` pointed at before its last move (what
  ``agent-finetune rollback`` returns to; usually the copy the last swap replaced).

They are copied, verified and loaded by the same road as a swap (``Served.load``: one
failure memory, the cache's byte bound), then kept loaded, routed to by no name, while they
stay chosen. At most ``max_staged`` at once (``AGENT_FINETUNE_MAX_STAGED``), chosen in that
order of kinds, then by recency (the newest publish, the newest pointer move), so the same
registry always stages the same copies: no thrashing between passes. A copy no longer
chosen joins the standby LRU (``server_plugin.served``). A version that fails to stage is
remembered like a failed swap: its promote then fails at once, with the same error.

Choosing reads the registry (version lists, the history for the rollback target, memoised
by the pointer's stamp) and runs in the pass's worker thread; loading runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent_finetune.errors import AgentFinetuneError
from agent_finetune.registry.index import Pointer
from agent_finetune.registry.names import version_number
from server_plugin.catalog import Catalog
from server_plugin.failures import Failures
from server_plugin.served import Served

logger = logging.getLogger(__name__)

KINDS = ("canary", "next", "rollback")
"""Why a version is staged, most important first."""


@dataclass(frozen=True)
class Want:
    """One version to keep loaded ahead, and why."""

    name: str
    version: str
    why: str


class Stager:
    """Choose the versions to load ahead (``plan``) and keep them loaded (``apply``)."""

    def __init__(
        self,
        served: Served,
        failures: Failures,
        catalog: Catalog,
        max_staged: int,
        canaries: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.served = served
        self.failures = failures
        self.catalog = catalog
        self.max_staged = max_staged
        # name -> the candidate version of its running canary (the plugin's router).
        self.canaries: Callable[[], Mapping[str, str]] = canaries or dict
        self._rollback: dict[str, tuple[object, str | None]] = {}  # name -> (stamp, version)
        self.errors: dict[tuple[str, str], str] = {}  # (name, version) -> why staging failed
        self.plan_: list[Want] = []

    # -- choosing (a worker thread: it may read the registry) ------------------------------
    def plan(self, pointers: Mapping[str, Pointer], eligible: Callable[[str], bool]) -> list[Want]:
        """The versions to keep loaded, at most ``max_staged``, most important first.
        ``eligible``: whether a name is served (lazy names that no request loaded are not
        staged: their first request loads them)."""
        if self.max_staged <= 0:
            return []
        canaries = dict(self.canaries())
        ranked: list[tuple[int, float, Want]] = []
        for name, pointer in pointers.items():
            current = pointer.version
            if current is None or pointer.error is not None or not eligible(name):
                continue
            candidate = canaries.get(name)
            if candidate is not None and candidate != current:
                ranked.append((0, 0.0, Want(name, candidate, "canary")))
            newest = self._newest_above(name, current)
            if newest is not None and newest != candidate:
                stamp = pointer.versions_stamp
                ranked.append((1, -(stamp[1] if stamp else 0), Want(name, newest, "next")))
            back = self._rollback_target(name, pointer)
            if back is not None and back not in (current, candidate, newest):
                ranked.append((2, -(pointer.moved_at or 0.0), Want(name, back, "rollback")))
        ranked.sort(key=lambda r: (r[0], r[1], r[2].name))
        return [want for _, _, want in ranked[: self.max_staged]]

    def _newest_above(self, name: str, current: str) -> str | None:
        versions = self.catalog.versions(name)
        if not versions or version_number(versions[-1]) <= version_number(current):
            return None
        return versions[-1]

    def _rollback_target(self, name: str, pointer: Pointer) -> str | None:
        """``Registry.previous_current``, read once per pointer move (it reads the history)."""
        memo = self._rollback.get(name)
        if memo is not None and memo[0] == pointer.stamp:
            return memo[1]
        try:
            back = self.served.registry.previous_current(name)
        except (AgentFinetuneError, OSError):
            back = None
        if back is not None and back not in self.catalog.versions(name):
            back = None  # collected by gc since
        self._rollback[name] = (pointer.stamp, back)
        return back

    def forget(self, name: str) -> None:
        self._rollback.pop(name, None)
        for key in [k for k in self.errors if k[0] == name]:
            del self.errors[key]

    # -- keeping them loaded (the loop) --------------------------------------------------
    async def apply(self, plan: list[Want], lock: Callable[[str], asyncio.Lock]) -> bool:
        """Mark what ``plan`` wants and is loaded as staged, load at most one copy that is
        not (a promote arriving meanwhile waits for one load, not for all), and let go of
        staged copies the plan no longer wants. Returns whether loads remain (the caller
        runs another pass at once). Never raises: a failure is remembered per version."""
        self.plan_ = plan
        wanted: dict[str, str] = {}
        loads = 0
        remaining = False
        for want in plan:
            served = self._loaded(want)
            if served is None and self._may_load(want):
                if loads:
                    remaining = True
                    continue
                loads += 1
                served = await self._stage(want, lock)
            if served is not None:
                wanted[served] = want.why
        for served in [s for s in self.served.staged if s not in wanted]:
            self.served.unstage(served)
        for served, why in wanted.items():
            self.served.stage(served, why)
        return remaining

    def _loaded(self, want: Want) -> str | None:
        """The served name of a loaded, unrouted copy of the wanted version (the content
        the pass last keyed for it), if any."""
        served = self.served
        for s in served.names_of(want.name):
            copy = served.copies[s]
            if copy.version == want.version and served.loaded(s) and not served.routed(s):
                return s
        return None

    def _may_load(self, want: Want) -> bool:
        failure = self.failures.of_version(want.name, want.version)
        return failure is None or not failure.blocks()

    async def _stage(self, want: Want, lock: Callable[[str], asyncio.Lock]) -> str | None:
        name, version = want.name, want.version
        served = self.served
        key = await asyncio.to_thread(served.key, name, version)
        if key is None:
            return None  # gone from the registry since the plan
        try:
            async with lock(name):
                copy = await served.load(name, version, bounded=True)
        except Exception as e:
            failure = self.failures.record((name, version, key), e)
            self.errors[(name, version)] = failure.error
            log = logger.exception
            if isinstance(e, (AgentFinetuneError, OSError)):
                log = logger.warning if failure.kind == "permanent" else logger.info
            log("agent_finetune: staging %s@%s (%s) failed: %s", name, version, want.why, e)
            return None
        self.failures.clear((name, version, key))
        self.errors.pop((name, version), None)
        served_name = served.served_name(copy)
        if served.routed(served_name):
            return None  # live meanwhile (or a pinned name routes to it)
        logger.info(
            "agent_finetune: staged %s (%s) in %.3fs",
            served_name,
            want.why,
            copy.load_seconds or 0.0,
        )
        return served_name
