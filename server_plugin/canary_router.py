"""Canary routing inside the server: split, count, guard, and end the canary by itself.

The registry holds the canary (``agent_finetune.registry.canary_state``); every replica
reads it on each resync (filesystem events wake it early) and applies the same split:

- **Routing.** A request for ``NAME`` goes to the candidate with probability ``weight``.
  With the OpenAI ``user`` field or an ``X-Session-ID`` header, the draw is a hash of that
  key and the canary id, so a user stays on one side for the canary's life; otherwise it is
  random. Only candidate requests are rewritten (``model`` -> ``NAME@vNNNN``, served through
  the pin path); the others pass untouched and are served by the current version.
- **Signals** (``server_plugin.canary_signals``) are counted for the version that actually
  answered (the answer's own ``model``), never for the side a request was sent to. Each
  replica writes its counters to ``<name>/rollout/counts/<replica>.json`` every pass and
  reads the others'; the guards judge the fleet's sum. Feedback is bound to the answers
  the fleet issued (``server_plugin.feedback``).
- **Guards** are judged after every recorded request or score and on every pass. A trip
  stops routing to the candidate at once on this replica, then records ``canary_abort``
  with the reason in the registry, so every other replica drops it on its next pass. A
  candidate that is refused for good (validation) aborts at once; a transient refusal
  (cache full, engine busy) counts as one candidate error. When the duration has passed
  green with ``min_requests`` candidate requests fleet-wide and ``auto_promote`` is set,
  the canary promotes, only if ``current`` is still its baseline (the registry checks).
- **Stale canaries** end here too: one whose candidate left the registry, or whose
  baseline is no longer current (an operator moved it; a writer died mid-promote).

No vLLM import here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from agent_finetune.errors import AgentFinetuneError, CurrentMovedError
from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import Canary, finish_canary, read_canary
from agent_finetune.registry.layout import CANARY, VERSIONS
from agent_finetune.registry.names import PIN_SEPARATOR, split_model, utc_now
from agent_finetune.registry.rollout import read_counts, replica_id, write_counts
from server_plugin import metrics
from server_plugin.canary_signals import (
    AnswerWatch,
    VersionStats,
    counts_document,
    describe,
    parse_counts,
    sticky_draw,
    summed,
    verdict,
)
from server_plugin.feedback import Answer, FeedbackBook

logger = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
"""Request header that makes routing sticky when the body has no OpenAI ``user`` field."""
_SESSION_HEADER_B = SESSION_HEADER.encode()
_UNRECORDED = "cannot record canary"
MAX_ENDED = 100
_LOOK_EVERY_S = 0.05
_LOOK_DELAYS_S = (0.1, 0.5)  # after the post: when the other replicas' writes have landed
_FLUSH_EVERY_S = 0.02

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Stats = dict[str, VersionStats]


@dataclass(frozen=True)
class Route:
    """Where one request for a canaried name went."""

    name: str
    version: str
    candidate: bool
    canary_id: str


@dataclass(frozen=True)
class _Ended:
    canary: Canary
    outcome: str
    reason: str


class CanaryRouter:
    """Per-replica canary state: what the registry says, plus what the fleet observed."""

    def __init__(
        self,
        registry: Registry,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        replica: str | None = None,
    ) -> None:
        self.registry = registry
        self.replica = replica or replica_id()
        self._rng = rng or random.Random()
        self._clock = clock
        self._canaries: dict[str, Canary] = {}
        self._local: dict[str, Stats] = {}  # canary id -> version -> this replica's counters
        self._fleet: dict[str, Stats] = {}  # canary id -> version -> the other replicas' sum
        self._replicas: dict[str, int] = {}  # canary id -> replicas with counters
        self._dirty: set[str] = set()
        self.book = FeedbackBook(registry, self.replica)
        self._ended: OrderedDict[str, _Ended] = OrderedDict()
        self._pending: dict[str, tuple[_Ended, dict[str, Any]]] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: dict[tuple[str, str, bool], tuple[Any, Any, Any]] = {}
        self._reads: dict[str, list[tuple[float, asyncio.Future[None]]]] = {}
        self._registry_names: frozenset[str] = frozenset()
        self._flushing: asyncio.Task[None] | None = None
        self.fleet_errors: dict[tuple[str, str], str] = {}  # (name, logs|counts) -> problem
        self.errors: dict[str, str] = {}  # name -> last registry problem
        self.unrouted_large = 0
        self.last_refresh: str | None = None

    @property
    def active(self) -> bool:
        return bool(self._canaries)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._canaries)

    def canary(self, name: str) -> Canary | None:
        return self._canaries.get(name)

    # -- registry ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read every ``<name>/canary`` file and apply it (blocking)."""
        found = self.read_registry()
        if found is not None:
            self.apply(*found)

    def read_registry(self) -> tuple[dict[str, Canary], dict[str, str]] | None:
        """(name -> canary, name -> problem, "stale: ..." for one to end) from the registry;
        None when it is unavailable. Blocking: the plugin calls this in a thread and
        ``apply`` on its loop, so a canary ended here never comes back from a racing read."""
        try:
            names, _ = self.registry.scan("any")
        except AgentFinetuneError:
            return None  # registry unavailable: keep what we have, like the reconciler
        self._registry_names = frozenset(names)
        found: dict[str, Canary] = {}
        errors: dict[str, str] = {}
        root = self.registry.root
        for name in names:
            if not os.path.exists(root / name / CANARY):
                continue
            try:
                c = read_canary(self.registry, name)
            except AgentFinetuneError as e:
                errors[name] = str(e)
                continue
            if c is None:
                continue
            found[name] = c
            if not (root / name / VERSIONS / c.version).is_dir():
                errors[name] = f"stale: candidate {c.version} left the registry"
            elif (current := self.registry.current(name)) != c.baseline:
                errors[name] = (
                    f"stale: current is {current}, not its baseline {c.baseline} "
                    "(current moved under it)"
                )
        return found, errors

    def apply(self, found: dict[str, Canary], errors: dict[str, str]) -> None:
        found = {n: c for n, c in found.items() if c.id not in self._ended}
        for name, c in found.items():
            old = self._canaries.get(name)
            if old is None or old.id != c.id:
                logger.info(
                    "agent_finetune: canary %s@%s on %g%% (vs %s)",
                    name,
                    c.version,
                    c.weight,
                    c.baseline,
                )
            metrics.CANARY_WEIGHT.labels(name).set(c.weight)
        for name in set(self._canaries) - set(found):
            metrics.CANARY_WEIGHT.labels(name).set(0)
        self._canaries = found
        for name, problem in errors.items():
            stale = found.get(name)
            if stale is not None and problem.startswith("stale: "):
                self._end(stale, "abort", problem.removeprefix("stale: "), {})
        pending_errors = {n: e for n, e in self.errors.items() if n not in errors}
        self.errors = {
            **{n: e for n, e in errors.items() if not e.startswith("stale: ")},
            **{n: e for n, e in pending_errors.items() if _UNRECORDED in e},
        }
        live = {c.id for c in self._canaries.values()} | set(self._pending)
        for stats in (self._local, self._fleet, self._replicas):
            for cid in [cid for cid in stats if cid not in live]:
                del stats[cid]
        self.book.keep_tallies(live)
        self.last_refresh = utc_now()

    # -- routing ----------------------------------------------------------------------------
    def choose(self, name: str, key: str | None) -> Route | None:
        """Which side serves this request of ``name`` (None: no canary)."""
        c = self._canaries.get(name)
        if c is None:
            return None
        draw = sticky_draw(c.id, key) if key else self._rng.random()
        if draw * 100 < c.weight:
            return Route(name, c.version, True, c.id)
        return Route(name, c.baseline, False, c.id)

    def route(self, data: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> Route | None:
        """Which side serves a parsed model request (None: its model has no canary)."""
        model = data.get("model")
        if not isinstance(model, str) or model not in self._canaries:
            return None
        user = data.get("user")
        key = user if isinstance(user, str) and user else None
        if key is None:
            key = next(
                (v.decode("latin-1") for k, v in headers if k.lower() == _SESSION_HEADER_B), None
            )
        return self.choose(model, key)

    @staticmethod
    def pinned(data: dict[str, Any], route: Route) -> dict[str, Any]:
        """The request for the candidate: ``model`` -> ``NAME@vNNNN``, everything else kept."""
        return {**data, "model": f"{route.name}{PIN_SEPARATOR}{route.version}"}

    def candidate_failed(self, route: Route, error: str, status: int) -> None:
        """The candidate could not be loaded; the request goes to current. A refusal for
        good (4xx: it will never load) ends the canary at once; a transient one (5xx)
        counts as one candidate error, judged by the error guard like any other."""
        c = self._canaries.get(route.name)
        if c is None or c.id != route.canary_id:
            return
        if status < 500:
            self._end(c, "abort", f"candidate cannot be served: {error}", {})
            return
        self._version_stats(route.canary_id, route.version).add(error=True, per_token_s=None)
        self._dirty.add(route.canary_id)
        self.judge(route.name)

    # -- signals ----------------------------------------------------------------------------
    def _series(self, name: str, version: str, candidate: bool) -> tuple[Any, Any, Any]:
        """The Prometheus children of one (name, version, role), looked up once."""
        key = (name, version, candidate)
        found = self._children.get(key)
        if found is None:
            role = "candidate" if candidate else "current"
            found = (
                metrics.CANARY_REQUESTS.labels(name, version, role),
                metrics.CANARY_ERRORS.labels(name, version, role),
                metrics.CANARY_LATENCY.labels(name, version),
            )
            self._children[key] = found
        return found

    def _version_stats(self, canary_id: str, version: str) -> VersionStats:
        return self._local.setdefault(canary_id, {}).setdefault(version, VersionStats())

    def record(self, route: Route, watch: AnswerWatch, seconds: float) -> None:
        """Count one finished request for the version that answered it, record its id, and
        judge the guards."""
        c = self._canaries.get(route.name)
        version = route.version
        answered = split_model(watch.model or "")
        if answered is not None and answered[0] == route.name:
            version = answered[1]  # the answer names who answered: that is the truth
        candidate = c is not None and version == c.version
        error = watch.failed or (candidate and watch.status == 404)
        self._version_stats(route.canary_id, version).add(
            error=error, per_token_s=None if error else seconds / watch.tokens
        )
        self._dirty.add(route.canary_id)
        requests, errors, latency = self._series(route.name, version, candidate)
        requests.inc()
        if error:
            errors.inc()
        latency.observe(seconds)
        if watch.answer_id and watch.status == 200 and not watch.stream_error:
            self.book.issued(watch.answer_id, Answer(route.name, version, route.canary_id))
            self._flush_soon()  # a score for it may come to another replica
        self.judge(route.name)

    def captured(self, name: str, answer_id: str, version: str) -> None:
        """A captured answer (no canary): feedback may name it, on any replica."""
        self.book.issued(answer_id, Answer(name, version, None))
        self._flush_soon()

    async def feedback(self, name: str, answer_id: str, score: float) -> dict[str, Any]:
        """Record an agent's score for an answer the fleet issued (UnknownResponseError for
        any other id); an id not known here yet is looked up in the other replicas' logs."""
        if self.book.lookup(name, answer_id) is None:
            await self._look_elsewhere(name, answer_id)
        result = self.book.score(name, answer_id, score)
        self._flush_soon()
        c = self._canaries.get(name)
        result["counted"] = c is not None and c.id == result["canary_id"]
        self.judge(name)
        return result

    # -- guards -----------------------------------------------------------------------------
    def fleet_stats(self, canary_id: str) -> Stats:
        return summed([self._local.get(canary_id, {}), self._fleet.get(canary_id, {})])

    def judge(self, name: str) -> tuple[str, str] | None:
        c = self._canaries.get(name)
        if c is None:
            return None
        stats = self.fleet_stats(c.id)
        decided = verdict(c, stats, self.book.tallies(c.id), self._clock())
        if decided is not None:
            outcome, reason = decided
            self._end(c, outcome, reason, self._evidence(c))
        return decided

    def _evidence(self, c: Canary) -> dict[str, Any]:
        tallies = self.book.tallies(c.id)
        return {
            v: describe(s, tallies.get(v))
            for v, s in sorted(self.fleet_stats(c.id).items())
            if v in (c.version, c.baseline)
        }

    def _end(self, c: Canary, outcome: str, reason: str, evidence: dict[str, Any]) -> None:
        """Stop routing now; write the outcome to the registry from the loop (off the request)."""
        if self._canaries.get(c.name) is c:
            del self._canaries[c.name]
        metrics.CANARY_WEIGHT.labels(c.name).set(0)
        ended = _Ended(c, outcome, reason)
        self._ended[c.id] = ended
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        self._pending[c.id] = (ended, evidence)
        logger.warning("agent_finetune: canary %s@%s %s: %s", c.name, c.version, outcome, reason)
        self.wake()

    def _write_pending(self) -> None:
        """Record ended canaries in the registry (blocking); keep failures for the next pass."""
        for cid, (ended, evidence) in list(self._pending.items()):
            c, outcome = ended.canary, ended.outcome
            try:
                finish_canary(
                    self.registry,
                    c.name,
                    "promote" if outcome == "promote" else "abort",
                    reason=ended.reason,
                    canary_id=cid,
                    evidence={"replica": self.replica, "versions": evidence},
                )
                metrics.CANARY_ENDS.labels(c.name, outcome).inc()
                self.errors.pop(c.name, None)
            except CurrentMovedError as e:  # the registry ended it as an abort instead
                logger.warning("agent_finetune: %s", e)
                self._ended[cid] = _Ended(c, "abort", str(e))
                metrics.CANARY_ENDS.labels(c.name, "abort").inc()
            except Exception as e:
                self.errors[c.name] = f"{_UNRECORDED} {outcome} in the registry: {e}"
                logger.exception(
                    "agent_finetune: recording canary %s of %s failed", outcome, c.name
                )
                continue
            del self._pending[cid]

    # -- the fleet --------------------------------------------------------------------------
    def _counts_to_write(self) -> dict[str, dict[str, Any]]:
        """name -> this replica's counters of its running canary, when they changed."""
        out = {
            name: counts_document(c.id, self.replica, self._clock(), self._local.get(c.id, {}))
            for name, c in self._canaries.items()
            if c.id in self._dirty
        }
        self._dirty.clear()
        return out

    def _swap_counts(
        self, mine: dict[str, dict[str, Any]], canaries: dict[str, str]
    ) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
        """Blocking: write this replica's counters, read the others' (name -> replica ->)."""
        problems = []
        for name, counts in mine.items():
            try:
                write_counts(self.registry.name_dir(name), self.replica, counts)
            except (OSError, AgentFinetuneError) as e:
                problems.append(f"{name}: cannot write canary counters: {e}")
        read = {
            name: read_counts(self.registry.name_dir(name), cid, skip=self.replica)
            for name, cid in canaries.items()
        }
        return read, problems

    def _take_counts(self, read: dict[str, dict[str, dict[str, Any]]]) -> None:
        for name, replicas in read.items():
            c = self._canaries.get(name)
            if c is not None:
                self._fleet[c.id] = summed(parse_counts(d) for d in replicas.values())
                self._replicas[c.id] = len(replicas) + 1

    def _note(self, topic: str, names: Iterable[str], problems: list[str]) -> None:
        """Keep each name's latest problem with the fleet's ``topic`` files for status; log
        it once, not every pass (a read-only registry would say it every second)."""
        for name in names:
            problem = next((p for p in problems if p.startswith(f"{name}: ")), None)
            if problem is None:
                self.fleet_errors.pop((name, topic), None)
            elif self.fleet_errors.get((name, topic)) != problem:
                self.fleet_errors[(name, topic)] = problem
                logger.warning("agent_finetune: %s", problem)

    async def _exchange(self, extra: Iterable[str] = (), *, read: bool = True) -> None:
        """Write this replica's answers and scores to the fleet's logs, and (``read``) read
        the other replicas' (for canaried names and ``extra``)."""
        outbox = self.book.take_outbox()
        names = (set(self._canaries) | set(extra)) if read else set()
        if not outbox and not names:
            return
        found, problems = await asyncio.to_thread(self.book.exchange, outbox, names)
        await self.book.merge(found)
        self._note("logs", {name for name, _ in outbox} | names, problems)

    def _flush_soon(self) -> None:
        """Write queued answers and scores within ``_FLUSH_EVERY_S``, one write per batch."""
        if self._flushing is not None or self._loop is None:
            return

        async def flush() -> None:
            try:
                await asyncio.sleep(_FLUSH_EVERY_S)
                await self._exchange(read=False)
            except Exception:
                logger.exception("agent_finetune: writing the fleet's answer log failed")
            finally:
                self._flushing = None

        self._flushing = self._loop.create_task(flush())

    async def _look_elsewhere(self, name: str, answer_id: str) -> None:
        """An id not known here: read the other replicas' logs of ``name``, first once their
        answers given before this post must have been written (they are recorded before the
        client gets the answer and written within ``_FLUSH_EVERY_S``), then once more, later.
        Misses share reads, and reads of one name start ``_LOOK_EVERY_S`` apart, so a flood
        of made-up ids costs one read per interval, not one per post."""
        if name not in self._registry_names:
            return  # no such adapter: nothing to read
        for delay in _LOOK_DELAYS_S:
            await self._read_after(name, time.monotonic() + delay)
            if self.book.lookup(name, answer_id) is not None:
                return

    async def _read_after(self, name: str, due: float) -> None:
        """Wait for a read of ``name``'s logs that starts at ``due`` or later."""
        reads = self._reads.setdefault(name, [])
        for start, task in reads:
            if start >= due:
                await asyncio.shield(task)
                return
        start = max([due, *(s + _LOOK_EVERY_S for s, _ in reads[-1:])])

        async def read() -> None:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            await self._exchange({name})

        task = asyncio.ensure_future(read())
        entry = (start, task)
        reads.append(entry)
        task.add_done_callback(lambda _: self._forget_read(name, entry))
        await asyncio.shield(task)

    def _forget_read(self, name: str, entry: tuple[float, asyncio.Future[None]]) -> None:
        reads = self._reads.get(name, [])
        if entry in reads:
            reads.remove(entry)
        if not reads:
            self._reads.pop(name, None)

    # -- loop -------------------------------------------------------------------------------
    def wake(self) -> None:
        loop, event = self._loop, self._wake
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)

    async def pass_once(self) -> None:
        if self._pending:
            await asyncio.to_thread(self._write_pending)
        found = await asyncio.to_thread(self.read_registry)
        if found is not None:
            self.apply(*found)
        await self._exchange()
        mine = self._counts_to_write()
        canaries = {n: c.id for n, c in self._canaries.items()}
        read, problems = await asyncio.to_thread(self._swap_counts, mine, canaries)
        self._take_counts(read)
        self._note("counts", mine, problems)
        for name in list(self._canaries):
            self.judge(name)
        if self._pending:
            await asyncio.to_thread(self._write_pending)

    async def run(self, resync_s: float) -> None:
        """Refresh and judge every ``resync_s`` seconds, or sooner when woken."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            try:
                await self.pass_once()
            except Exception:
                logger.exception("agent_finetune: canary pass failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=resync_s)
            self._wake.clear()

    # -- reporting --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        names: dict[str, Any] = {}
        now = self._clock()
        for name, c in sorted(self._canaries.items()):
            tallies = self.book.tallies(c.id)
            stats = self.fleet_stats(c.id)
            names[name] = {
                "version": c.version,
                "baseline": c.baseline,
                "weight": c.weight,
                "id": c.id,
                "auto_promote": c.auto_promote,
                "elapsed_s": round(c.elapsed_s(now), 3),
                "guards": c.guards.__dict__,
                "verdict": "running",
                "replicas": self._replicas.get(c.id, 1),
                "versions": {
                    v: {
                        "role": "candidate" if v == c.version else "current",
                        **describe(s, tallies.get(v)),
                        "this_replica_requests": self._local.get(c.id, {})
                        .get(v, VersionStats())
                        .requests,
                    }
                    for v, s in stats.items()
                },
            }
        ended = [
            {
                "name": e.canary.name,
                "version": e.canary.version,
                "outcome": e.outcome,
                "reason": e.reason,
                "id": cid,
                "recorded": cid not in self._pending,
            }
            for cid, e in list(self._ended.items())[-20:]
        ]
        return {
            "replica": self.replica,
            "names": names,
            "ended": ended,
            "errors": {**{n: e for (n, _), e in self.fleet_errors.items()}, **self.errors},
            "last_refresh": self.last_refresh,
            "feedback_records_dropped": self.book.dropped,
            "unrouted_large_bodies": self.unrouted_large,
        }

    def wrap_send(
        self, route: Route, send: Send, started: float
    ) -> tuple[Send, Callable[[], None]]:
        """An ASGI ``send`` that watches the answer (status, id, who answered, errors inside
        a stream, output tokens), and a ``finish`` to call when the app returns or raises
        (records a 500 if nothing was sent)."""
        watch = AnswerWatch()
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self.record(route, watch, time.perf_counter() - started)

        async def wrapped(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                watch.start(int(message.get("status", 500)))
            elif kind == "http.response.body":
                watch.body(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    finish()
            await send(message)

        return wrapped, finish
