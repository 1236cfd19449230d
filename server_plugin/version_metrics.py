"""Per-version Prometheus series, bounded: where each version lives, its load time, and the
requests, tokens and errors it answered.

Series (labels ``name`` and ``version``; every value comes from the server's own state):

- ``agent_finetune_version_residency``: 3 ``active`` (answering requests now: in one of the
  engine's GPU LoRA slots), 2 ``loaded`` (in vLLM's adapter table: its CPU LoRA cache),
  1 ``disk`` (the server's verified copy exists, not loaded); a version with none of these
  has no series (0, not loaded);
- ``agent_finetune_version_role``: 1 per loaded version and its role: ``live`` (a name
  routes to it), ``staged`` (loaded ahead: next, canary, rollback) or ``standby``;
- ``agent_finetune_version_load_seconds``: copy + verify + load of the loaded copy;
- ``agent_finetune_version_requests_total``, ``..._prompt_tokens_total``,
  ``..._completion_tokens_total``, ``..._errors_total``: answers by the version that
  answered (the ``model`` of the answer), their token usage when the answer carries it
  (every non-streamed answer; streamed ones with ``stream_options.include_usage``), and
  answers that failed (HTTP 5xx, or an error event in a stream).

Bounded cardinality: residency, role and load time exist only for the versions loaded now
(the engine's adapter bound), read from the reconcile loop at scrape time, so nothing
lingers after an unload. The counters keep at most ``max_versions`` versions (least
recently answering first out); a version pushed out, and any answer that names no version
this server loaded, adds to the one ``name="_other", version="_other"`` series, so the sum
over series stays exact. An answer's model comes from vLLM's own response (the name it
resolved), never from the client's request.

No vLLM import here; ``server_plugin.answers`` calls :meth:`VersionMetrics.answer_started`
and :meth:`VersionMetrics.answer_ended` for every model-route answer.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY

from agent_finetune.registry.names import split_model

OTHER = "_other"
MAX_VERSIONS = 512
RESIDENCY = {"active": 3, "loaded": 2, "disk": 1}
_USAGE = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
_STREAM_ERROR = b'{"error"'


@dataclass
class Totals:
    """What one version answered."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors


@dataclass
class Answer:
    """One answer being sent: the version it names, and what its body said so far."""

    key: tuple[str, str]
    usage: dict[str, int] = field(default_factory=dict)
    error: bool = False


@dataclass(frozen=True)
class Loaded:
    """A version the server has loaded, as the reconcile loop sees it."""

    name: str
    version: str
    role: str
    load_seconds: float | None


class VersionMetrics:
    """Per-version counters and the collector that exports them with the loop's state."""

    def __init__(self, max_versions: int = MAX_VERSIONS) -> None:
        self.max_versions = max_versions
        self.totals: OrderedDict[tuple[str, str], Totals] = OrderedDict()
        self.other = Totals()
        self.in_flight: Counter[tuple[str, str]] = Counter()
        # Set by the plugin: the versions loaded now, and the copies on disk (name, version).
        self.loaded: Callable[[], list[Loaded]] = list
        self.on_disk: Callable[[], list[tuple[str, str]]] = list
        self._lock = threading.Lock()  # answers count on the loop, scrapes read in a thread

    # -- the request path: a few dict operations per answer ------------------------------
    def answer_started(self, model: str | None) -> Answer | None:
        """An answer of ``model`` (vLLM's name of what answered) starts; None: the base model."""
        if not model:
            return None
        parsed = split_model(model.partition("+")[0])
        key = parsed if parsed is not None else None
        if key is None:
            return None
        self.in_flight[key] += 1
        return Answer(key)

    def body(self, answer: Answer, data: bytes) -> None:
        """A body message of the answer: token usage, or a streamed error event."""
        if b"_tokens" in data:
            for kind, value in _USAGE.findall(data):
                answer.usage[kind.decode()] = int(value)
        if _STREAM_ERROR in data:
            answer.error = True

    def answer_ended(self, answer: Answer, status: int) -> None:
        key = answer.key
        if self.in_flight[key] <= 1:
            del self.in_flight[key]
        else:
            self.in_flight[key] -= 1
        with self._lock:
            totals = self.totals.get(key)
            if totals is None:
                totals = self.totals[key] = Totals()
                while len(self.totals) > self.max_versions:
                    _, old = self.totals.popitem(last=False)
                    self.other.add(old)
            else:
                self.totals.move_to_end(key)
            totals.requests += 1
            totals.prompt_tokens += answer.usage.get("prompt_tokens", 0)
            totals.completion_tokens += answer.usage.get("completion_tokens", 0)
            totals.errors += int(answer.error or status >= 500)

    # -- the scrape ------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        labels = ["name", "version"]
        residency = GaugeMetricFamily(
            "agent_finetune_version_residency",
            "Where each version lives: 3 active (answering now: in a GPU LoRA slot), 2 "
            "loaded (vLLM's adapter table: its CPU LoRA cache), 1 disk (the server's "
            "verified copy only); no series: not loaded.",
            labels=labels,
        )
        role = GaugeMetricFamily(
            "agent_finetune_version_role",
            "1 for each loaded version and its role: live (a name routes to it), staged "
            "(loaded ahead of going live) or standby (pinned or replaced).",
            labels=[*labels, "role"],
        )
        load = GaugeMetricFamily(
            "agent_finetune_version_load_seconds",
            "Seconds the loaded copy of each version took to copy, verify and load.",
            labels=labels,
        )
        loaded = self.loaded()
        seen: set[tuple[str, str]] = set()
        in_flight = dict(self.in_flight)
        for v in loaded:
            key = (v.name, v.version)
            if key in seen:
                continue
            seen.add(key)
            where = "active" if in_flight.get(key) else "loaded"
            residency.add_metric(list(key), RESIDENCY[where])
            role.add_metric([*key, v.role], 1)
            if v.load_seconds is not None:
                load.add_metric(list(key), v.load_seconds)
        for key in self.on_disk():
            if key not in seen:
                seen.add(key)
                residency.add_metric(list(key), RESIDENCY["disk"])
        yield residency
        yield role
        yield load
        with self._lock:
            rows = [(k, Totals(**vars(t))) for k, t in self.totals.items()]
            rows.append(((OTHER, OTHER), Totals(**vars(self.other))))
        for metric, what in (
            ("requests", "Answers by the version that answered."),
            ("prompt_tokens", "Prompt tokens of the answers that reported usage, by version."),
            ("completion_tokens", "Completion tokens of the answers that reported usage."),
            ("errors", "Answers that failed (HTTP 5xx or a streamed error), by version."),
        ):
            family = CounterMetricFamily(
                f"agent_finetune_version_{metric}", what + _BOUND, labels=labels
            )
            for key, totals in rows:
                family.add_metric(list(key), getattr(totals, metric))
            yield family


_BOUND = f" At most {MAX_VERSIONS} versions; the rest add to name/version {OTHER}."


class _Collector:
    """What the registry asks at scrape time (prometheus_client's collector protocol)."""

    def __init__(self) -> None:
        self.target: VersionMetrics | None = None

    def collect(self) -> Iterator[Any]:
        if self.target is not None:
            yield from self.target.collect()


_COLLECTOR = _Collector()
_REGISTERED = False


def install(metrics: VersionMetrics) -> VersionMetrics:
    """Export ``metrics`` in prometheus_client's default registry (vLLM's ``/metrics``);
    once per process, the latest call wins (the plugin starts once)."""
    global _REGISTERED
    _COLLECTOR.target = metrics
    if not _REGISTERED:
        REGISTRY.register(_COLLECTOR)
        _REGISTERED = True
    return metrics
