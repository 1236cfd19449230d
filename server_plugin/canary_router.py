"""Canary routing inside the server: split, count, guard, and end the canary by itself.

The registry holds the canary (``agent_finetune.registry.canary_state``); every replica reads it
on each resync (filesystem events wake it early) and applies the same split:

- **Routing.** A request for ``NAME`` goes to the candidate with probability ``weight``.
  With the OpenAI ``user`` field or an ``X-Session-ID`` header, the draw is a hash of that
  key and the canary id, so a user stays on one side for the canary's life; otherwise it is
  random. Only candidate requests are rewritten (``model`` -> ``NAME@vNNNN``, served through
  the pin path); the others pass untouched and are served by the current version.
- **Signals**, per version, per replica: requests, HTTP 5xx errors, a latency window and a
  Prometheus histogram, and feedback scores that agents post for a response id.
- **Guards** are judged after every recorded request or score and on every pass. A trip
  stops routing to the candidate at once on this replica, then records ``canary_abort``
  with the reason in the registry, so every other replica drops it on its next pass.
  When the duration has passed green, ``auto_promote`` is set and this replica has seen at
  least ``min_requests`` candidate requests, it promotes (the first replica wins; the
  canary id makes the others' attempts no-ops).

No vLLM import here; the plugin calls ``route_body``, ``wrap_send`` and ``feedback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from agent_finetune.errors import AgentFinetuneError, FeedbackError
from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import Canary, finish_canary, read_canary
from agent_finetune.registry.layout import CANARY
from agent_finetune.registry.names import PIN_SEPARATOR, utc_now
from server_plugin import metrics

logger = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
"""Request header that makes routing sticky when the body has no OpenAI ``user`` field."""
_SESSION_HEADER_B = SESSION_HEADER.encode()
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_UNRECORDED = "cannot record canary"
LATENCY_WINDOW = 2048
MAX_RESPONSES = 100_000

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    """Where one request for a canaried name went."""

    name: str
    version: str
    candidate: bool
    canary_id: str


@dataclass
class VersionStats:
    """One version's signals during one canary, on this replica."""

    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    feedback: int = 0
    negatives: int = 0
    score_sum: float = 0.0

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "p50_s": self.quantile(0.5),
            "p95_s": self.quantile(0.95),
            "feedback": self.feedback,
            "negative_rate": self.negatives / self.feedback if self.feedback else None,
            "mean_score": self.score_sum / self.feedback if self.feedback else None,
        }


def sticky_draw(canary_id: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (canary, key): the same user, the same side."""
    digest = hashlib.blake2b(f"{canary_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def verdict(canary: Canary, stats: dict[str, VersionStats], now: float) -> tuple[str, str] | None:
    """("abort"|"promote", reason) when a guard trips or the canary may be promoted, else None."""
    g = canary.guards
    cand = stats.get(canary.version) or VersionStats()
    base = stats.get(canary.baseline) or VersionStats()
    if cand.requests >= g.min_requests:
        rate = cand.errors / cand.requests
        if rate > g.max_error_rate:
            return "abort", (
                f"error rate {rate:.3f} > {g.max_error_rate:g} "
                f"({cand.errors} of {cand.requests} candidate requests)"
            )
        if base.requests >= g.min_requests and cand.latencies and base.latencies:
            c50, b50 = statistics.median(cand.latencies), statistics.median(base.latencies)
            if b50 > 0 and c50 / b50 > g.max_latency_ratio:
                return "abort", (
                    f"median latency {c50:.3f}s is {c50 / b50:.2f}x the current version's "
                    f"{b50:.3f}s (limit {g.max_latency_ratio:g}x)"
                )
    if cand.feedback >= g.min_feedback:
        neg = cand.negatives / cand.feedback
        if neg > g.max_negative_feedback:
            return "abort", (
                f"negative feedback {neg:.2f} > {g.max_negative_feedback:g} "
                f"({cand.negatives} of {cand.feedback} scores)"
            )
    ready = canary.elapsed_s(now) >= g.duration_s and cand.requests >= g.min_requests
    if canary.auto_promote and ready:
        return "promote", (
            f"green for {canary.elapsed_s(now):.0f}s (>= {g.duration_s:g}s) over "
            f"{cand.requests} candidate requests"
        )
    return None


def parse_feedback(data: Any) -> tuple[str, float, str | None]:
    """(response id, score, model) from a feedback body; FeedbackError says what is wrong."""
    if not isinstance(data, dict):
        raise FeedbackError('expected a JSON object {"id": <response id>, "score": -1..1}')
    rid, score, model = data.get("id"), data.get("score"), data.get("model")
    if not isinstance(rid, str) or not rid:
        raise FeedbackError('"id" must be the response id (the "id" field of the answer)')
    if isinstance(score, bool) or not isinstance(score, int | float) or not -1 <= score <= 1:
        raise FeedbackError(f'"score" must be a number from -1 (bad) to 1 (good), got {score!r}')
    if model is not None and not isinstance(model, str):
        raise FeedbackError('"model" must be the answer\'s model string, e.g. "name@v0002"')
    return rid, float(score), model


class CanaryRouter:
    """Per-replica canary state: what the registry says, plus what this replica observed."""

    def __init__(
        self,
        registry: Registry,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self._rng = rng or random.Random()
        self._clock = clock
        self._canaries: dict[str, Canary] = {}
        self._stats: dict[str, dict[str, VersionStats]] = {}  # canary id -> version -> stats
        self._responses: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self._ended: dict[str, tuple[Canary, str, str]] = {}  # id -> (canary, outcome, reason)
        self._pending: dict[str, tuple[Canary, str, str, dict[str, Any]]] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: dict[tuple[str, str, bool], tuple[Any, Any, Any]] = {}
        self.errors: dict[str, str] = {}  # name -> last registry problem
        self.last_refresh: str | None = None

    @property
    def active(self) -> bool:
        return bool(self._canaries)

    def canary(self, name: str) -> Canary | None:
        return self._canaries.get(name)

    # -- registry ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read every ``<name>/canary`` file and apply it (blocking)."""
        found = self.read_registry()
        if found is not None:
            self.apply(*found)

    def read_registry(self) -> tuple[dict[str, Canary], dict[str, str]] | None:
        """(name -> canary, name -> problem) from the registry; None when it is unavailable.

        Blocking file reads: the plugin calls this in a thread and ``apply`` on its loop, so a
        canary this replica just ended can never come back from a read that raced the end.
        """
        try:
            names, _ = self.registry.scan("any")
        except AgentFinetuneError:
            return None  # registry unavailable: keep what we have, like the reconciler
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
            if c is not None:
                found[name] = c
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
        pending_errors = {n: e for n, e in self.errors.items() if n not in errors}
        self.errors = {
            **errors,
            **{n: e for n, e in pending_errors.items() if "cannot record" in e},
        }
        live_ids = {c.id for c in found.values()} | set(self._pending)
        for cid in [cid for cid in self._stats if cid not in live_ids]:
            del self._stats[cid]
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

    def route_body(
        self, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, Route | None]:
        """Route one model request: the body to forward (rewritten for the candidate)."""
        if not self._canaries:
            return body, None
        # Most requests name other models: a substring test is far cheaper than parsing.
        if not any(f'"{n}"'.encode() in body for n in self._canaries):
            return body, None
        try:
            data = json.loads(body)
        except ValueError:
            return body, None  # vLLM reports the bad body itself
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or model not in self._canaries:
            return body, None
        user = data.get("user")
        key = user if isinstance(user, str) and user else None
        if key is None:
            key = next(
                (v.decode("latin-1") for k, v in headers if k.lower() == _SESSION_HEADER_B), None
            )
        route = self.choose(model, key)
        if route is None or not route.candidate:
            return body, route
        pinned = f"{model}{PIN_SEPARATOR}{route.version}"
        # Rewrite the one "model" member in place (the rest of the body stays byte-identical);
        # re-serialise only if it is written in some unusual way.
        pattern = re.compile(rb'"model"\s*:\s*"' + re.escape(model.encode()) + rb'"')
        out, count = pattern.subn(b'"model":"' + pinned.encode() + b'"', body)
        if count != 1:
            data["model"] = pinned
            out = json.dumps(data, ensure_ascii=False).encode("utf-8")
        return out, route

    def candidate_failed(self, route: Route, error: str) -> None:
        """The candidate could not be loaded: abort at once (the request goes to current)."""
        c = self._canaries.get(route.name)
        if c is not None and c.id == route.canary_id:
            self._end(c, "abort", f"candidate cannot be served: {error}", {})

    # -- signals ----------------------------------------------------------------------------
    def _series(self, route: Route) -> tuple[Any, Any, Any]:
        """The Prometheus children of one (name, version, role), looked up once."""
        key = (route.name, route.version, route.candidate)
        found = self._children.get(key)
        if found is None:
            role = "candidate" if route.candidate else "current"
            found = (
                metrics.CANARY_REQUESTS.labels(route.name, route.version, role),
                metrics.CANARY_ERRORS.labels(route.name, route.version, role),
                metrics.CANARY_LATENCY.labels(route.name, route.version),
            )
            self._children[key] = found
        return found

    def _version_stats(self, canary_id: str, version: str) -> VersionStats:
        return self._stats.setdefault(canary_id, {}).setdefault(version, VersionStats())

    def record(self, route: Route, status: int, seconds: float, response_id: str | None) -> None:
        """Count one finished request and judge the guards."""
        s = self._version_stats(route.canary_id, route.version)
        s.requests += 1
        error = status >= 500
        if error:
            s.errors += 1
        else:
            s.latencies.append(seconds)
        requests, errors, latency = self._series(route)
        requests.inc()
        if error:
            errors.inc()
        latency.observe(seconds)
        if response_id:
            self._responses[response_id] = (route.name, route.version, route.canary_id)
            while len(self._responses) > MAX_RESPONSES:
                self._responses.popitem(last=False)
        self.judge(route.name)

    def feedback(
        self, name: str, response_id: str, score: float, model: str | None
    ) -> dict[str, Any]:
        """Record an agent's score for a response; KeyError when its version is unknown."""
        known = self._responses.get(response_id)
        if known is not None and known[0] == name:
            _, version, canary_id = known
        else:
            # Another replica answered it: the answer's `model` says which version did.
            name_part, _, version = (model or "").partition(PIN_SEPARATOR)
            c = self._canaries.get(name)
            if name_part != name or not version or c is None:
                raise KeyError(response_id)
            canary_id = c.id
        s = self._version_stats(canary_id, version)
        s.feedback += 1
        s.score_sum += score
        if score < 0:
            s.negatives += 1
        metrics.CANARY_FEEDBACK.labels(name, version, "negative" if score < 0 else "positive").inc()
        self.judge(name)
        return {"name": name, "version": version, "recorded": True}

    # -- guards -----------------------------------------------------------------------------
    def judge(self, name: str) -> tuple[str, str] | None:
        c = self._canaries.get(name)
        if c is None:
            return None
        decided = verdict(c, self._stats.get(c.id, {}), self._clock())
        if decided is not None:
            outcome, reason = decided
            evidence = {v: s.as_dict() for v, s in self._stats.get(c.id, {}).items()}
            self._end(c, outcome, reason, evidence)
        return decided

    def _end(self, c: Canary, outcome: str, reason: str, evidence: dict[str, Any]) -> None:
        """Stop routing now; write the outcome to the registry from the loop (off the request)."""
        if self._canaries.get(c.name) is c:
            del self._canaries[c.name]
        metrics.CANARY_WEIGHT.labels(c.name).set(0)
        self._ended[c.id] = (c, outcome, reason)
        self._pending[c.id] = (c, outcome, reason, evidence)
        logger.warning("agent_finetune: canary %s@%s %s: %s", c.name, c.version, outcome, reason)
        self.wake()

    def _write_pending(self) -> None:
        """Record ended canaries in the registry (blocking); keep failures for the next pass."""
        for cid, (c, outcome, reason, evidence) in list(self._pending.items()):
            try:
                finish_canary(
                    self.registry,
                    c.name,
                    "promote" if outcome == "promote" else "abort",
                    reason=reason,
                    canary_id=cid,
                    evidence={"replica": os.getpid(), "versions": evidence},
                )
                metrics.CANARY_ENDS.labels(c.name, outcome).inc()
                self.errors.pop(c.name, None)
            except Exception as e:
                self.errors[c.name] = f"{_UNRECORDED} {outcome} in the registry: {e}"
                logger.exception(
                    "agent_finetune: recording canary %s of %s failed", outcome, c.name
                )
                continue
            del self._pending[cid]

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
            stats = self._stats.get(c.id, {})
            names[name] = {
                "version": c.version,
                "baseline": c.baseline,
                "weight": c.weight,
                "id": c.id,
                "auto_promote": c.auto_promote,
                "elapsed_s": round(c.elapsed_s(now), 3),
                "guards": c.guards.__dict__,
                "verdict": "running",
                "versions": {
                    v: {"role": "candidate" if v == c.version else "current", **s.as_dict()}
                    for v, s in stats.items()
                },
            }
        ended = [
            {
                "name": c.name,
                "version": c.version,
                "outcome": o,
                "reason": r,
                "id": cid,
                "recorded": cid not in self._pending,
            }
            for cid, (c, o, r) in list(self._ended.items())[-20:]
        ]
        return {
            "names": names,
            "ended": ended,
            "errors": dict(self.errors),
            "last_refresh": self.last_refresh,
        }

    def wrap_send(
        self, route: Route, send: Send, started: float
    ) -> tuple[Send, Callable[[], None]]:
        """An ASGI ``send`` that records status, latency and response id of ``route``, and a
        ``finish`` to call when the app returns or raises (records a 500 if nothing was sent)."""
        state: dict[str, Any] = {"status": 500, "id": None, "first": True, "done": False}

        def finish() -> None:
            if not state["done"]:
                state["done"] = True
                self.record(route, state["status"], time.perf_counter() - started, state["id"])

        async def wrapped(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                state["status"] = int(message.get("status", 500))
            elif kind == "http.response.body":
                if state["first"]:
                    state["first"] = False
                    m = _ID_RE.search(bytes(message.get("body", b""))[:4096])
                    state["id"] = m.group(1).decode("utf-8", "replace") if m else None
                if not message.get("more_body", False):
                    finish()
            await send(message)

        return wrapped, finish
