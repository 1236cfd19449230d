"""The one memory of failed loads, for public names, pinned versions and lazy names alike.

A failure is remembered per ``(name, version, content key)``: the same bytes fail the same
way whichever road loaded them (a name's swap in the reconcile loop, a pinned
``name@vNNNN`` request, a lazy name's first request), and a request for them is refused
with the same text. Failures have kinds:

- **permanent** (validation, a vLLM 4xx refusal): remembered until the version's content
  changes or ``current`` moves;
- **transient** (I/O, vLLM 5xx, timeouts: ``OSError``): retried after a capped exponential
  backoff with jitter; until then a request gets a 503 that says when.

Only versions that exist are ever loaded, so the memory is bounded by the registry.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Literal

from agent_finetune.errors import AgentFinetuneError, ValidationError
from server_plugin import metrics

FailureKind = Literal["permanent", "transient"]
Key = tuple[str, str, "str | None"]
"""(name, version, manifest content key or None when the manifest could not be read)."""


def failure_kind(exc: BaseException) -> FailureKind:
    """Transient: I/O and server unavailability (``OSError``, timeouts). Permanent: the
    adapter or the server's refusal of it (validation, 4xx). A bug counts as transient:
    retrying it with backoff is cheap and it may be a race."""
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return "transient"
    if isinstance(exc, AgentFinetuneError):
        return "permanent"
    return "transient"


def describe(exc: BaseException) -> str:
    """An exception as status and refusals show it (every validation problem, joined)."""
    if isinstance(exc, ValidationError) and exc.problems:
        return "; ".join(exc.problems)
    return f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)


@dataclass(frozen=True)
class Refusal:
    """Why a request's model cannot be served now: ``status`` 400 (permanent) or 503."""

    message: str
    status: int = 400


@dataclass
class Failure:
    """The last failure of one version's content, and when it may be tried again."""

    kind: FailureKind
    error: str
    attempts: int = 1
    next_try: float = 0.0  # monotonic

    def blocks(self) -> bool:
        """Whether a load must not be tried now (permanent, or its backoff not over)."""
        return self.kind == "permanent" or time.monotonic() < self.next_try

    def refusal(self, model: str) -> Refusal:
        if self.kind == "permanent":
            return Refusal(f"{model} cannot be served: {self.error}")
        return Refusal(f"{model} cannot be served now: {self.error} (retry later)", 503)


class Failures:
    """Failed loads by ``Key``, with the backoff of transient ones."""

    def __init__(
        self, retry_base_s: float, retry_max_s: float, rng: random.Random | None = None
    ) -> None:
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._rng = rng or random.Random()
        self._failed: dict[Key, Failure] = {}

    def get(self, key: Key) -> Failure | None:
        return self._failed.get(key)

    def blocking(self, key: Key) -> Failure | None:
        """The failure that forbids loading ``key`` now, if any."""
        failure = self._failed.get(key)
        return failure if failure is not None and failure.blocks() else None

    def of_version(self, name: str, version: str) -> Failure | None:
        """The failure of any content of ``name@version`` (a lazy name's pass reads none)."""
        return next((f for k, f in self._failed.items() if k[:2] == (name, version)), None)

    def record(self, key: Key, exc: BaseException) -> Failure:
        """Remember that loading ``key`` failed with ``exc``; the attempts add up."""
        previous = self._failed.get(key)
        kind = failure_kind(exc)
        attempts = previous.attempts + 1 if previous is not None else 1
        failure = Failure(kind, describe(exc), attempts)
        if kind == "transient":
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
            failure.next_try = time.monotonic() + delay * (0.5 + self._rng.random() / 2)
        self._failed[key] = failure
        metrics.FAILURES.labels(key[0], kind).inc()
        return failure

    def clear(self, key: Key) -> None:
        self._failed.pop(key, None)

    def forget(self, name: str) -> None:
        """Forget every failure of ``name`` (its ``current`` moved, or it left)."""
        for key in [k for k in self._failed if k[0] == name]:
            del self._failed[key]

    def next_due(self) -> float | None:
        """When the earliest transient failure may be retried (monotonic), if any."""
        due = [f.next_try for f in self._failed.values() if f.kind == "transient"]
        return min(due) if due else None

    def errors(self) -> dict[str, str]:
        """``name@version`` -> its last error, for every remembered failure."""
        return {f"{k[0]}@{k[1]}": f.error for k, f in self._failed.items()}
