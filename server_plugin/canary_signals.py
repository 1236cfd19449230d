"""What a canary is judged on: per-version counters that add up across replicas, and the
verdict on their sum.

- **Requests and errors.** An error is an HTTP 5xx, an error event inside a 200 stream
  (vLLM's in-band ``data: {"error": ...}``), or, for the candidate, a 404 (its version left
  the registry) or a transient refusal to load it.
- **Latency per output token**, so a client's ``max_tokens`` does not decide the verdict:
  whole-request seconds divided by the answer's ``completion_tokens`` (``output_tokens`` on
  the Responses API) when the answer carries usage, else by its streamed events. Kept as a
  log-scale histogram (8 buckets per doubling): replicas' histograms add up exactly, and the
  median of the sum is within 9% of the true median.
- **Feedback** tallies come from the fleet's feedback log (``server_plugin.feedback``).

No vLLM import here.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent_finetune.registry.canary_state import Canary
from server_plugin.answers import answer_fields

BUCKETS_PER_DOUBLING = 8
_MIN_EXP = -17  # 2**-17 s: 7.6 us per token
_MAX_BUCKET = (7 - _MIN_EXP) * BUCKETS_PER_DOUBLING  # 2**7 s: 128 s per token
_STREAM_ERROR_RE = re.compile(rb'(?:^|\n)(?:data: \{"error"|event: error\n)')
_USAGE_RE = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d{1,9})')
_EVENT = b"data: "


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a per-token latency."""
    if not seconds > 0:
        return 0
    b = math.floor((math.log2(seconds) - _MIN_EXP) * BUCKETS_PER_DOUBLING)
    return min(max(b, 0), _MAX_BUCKET)


def bucket_value(bucket: int) -> float:
    """The (geometric) middle of a bucket, in seconds."""
    return float(2 ** (_MIN_EXP + (bucket + 0.5) / BUCKETS_PER_DOUBLING))


@dataclass
class VersionStats:
    """One version's request signals during one canary (one replica's, or a sum)."""

    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    """Histogram of seconds per output token of the answers without error."""

    def add(self, *, error: bool, per_token_s: float | None) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        elif per_token_s is not None:
            b = bucket_of(per_token_s)
            self.latency[b] = self.latency.get(b, 0) + 1

    def merge(self, other: VersionStats) -> VersionStats:
        latency = dict(self.latency)
        for b, n in other.latency.items():
            latency[b] = latency.get(b, 0) + n
        return VersionStats(self.requests + other.requests, self.errors + other.errors, latency)

    def quantile(self, q: float) -> float | None:
        total = sum(self.latency.values())
        if not total:
            return None
        seen, want = 0, q * total
        for b in sorted(self.latency):
            seen += self.latency[b]
            if seen >= want:
                return bucket_value(b)
        return bucket_value(max(self.latency))

    def counts(self) -> dict[str, Any]:
        """For ``<name>/rollout/counts/<replica>.json``."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency": {str(b): n for b, n in self.latency.items()},
        }

    @classmethod
    def from_counts(cls, data: Any) -> VersionStats | None:
        """Counters another replica wrote; None when they are malformed."""
        try:
            requests, errors = int(data["requests"]), int(data["errors"])
            latency = {int(b): int(n) for b, n in dict(data["latency"]).items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if min(requests, errors, *latency.values(), 0) < 0 or errors > requests:
            return None
        return cls(requests, errors, {min(max(b, 0), _MAX_BUCKET): n for b, n in latency.items()})


@dataclass
class Tally:
    """The feedback on one version: each answer's latest score, once."""

    scores: int = 0
    negatives: int = 0
    total: float = 0.0

    def change(self, score: float, sign: int) -> None:
        """Add (``sign`` 1) or take back (``sign`` -1) one answer's score."""
        self.scores += sign
        self.negatives += sign * (score < 0)
        self.total += sign * score


def describe(stats: VersionStats, tally: Tally | None) -> dict[str, Any]:
    """A version's signals as ``/v1/adapters`` shows them."""
    t = tally or Tally()
    return {
        "requests": stats.requests,
        "errors": stats.errors,
        "error_rate": stats.errors / stats.requests if stats.requests else None,
        "p50_token_s": stats.quantile(0.5),
        "p95_token_s": stats.quantile(0.95),
        "feedback": t.scores,
        "negative_rate": t.negatives / t.scores if t.scores else None,
        "mean_score": t.total / t.scores if t.scores else None,
    }


def sticky_draw(canary_id: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (canary, key): the same user, the same side."""
    digest = hashlib.blake2b(f"{canary_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def verdict(
    canary: Canary, stats: dict[str, VersionStats], tallies: dict[str, Tally], now: float
) -> tuple[str, str] | None:
    """("abort"|"promote", reason) on the fleet's sums, or None while the canary runs on."""
    g = canary.guards
    cand = stats.get(canary.version) or VersionStats()
    base = stats.get(canary.baseline) or VersionStats()
    if cand.requests >= g.min_requests:
        rate = cand.errors / cand.requests
        if rate > g.max_error_rate:
            return "abort", (
                f"error rate {rate:.3f} > {g.max_error_rate:g} "
                f"({cand.errors} of {cand.requests} candidate requests, all replicas)"
            )
        c50, b50 = cand.quantile(0.5), base.quantile(0.5)
        if base.requests >= g.min_requests and c50 and b50 and c50 / b50 > g.max_latency_ratio:
            return "abort", (
                f"median latency per output token {c50 * 1000:.2f} ms is {c50 / b50:.2f}x "
                f"the current version's {b50 * 1000:.2f} ms (limit {g.max_latency_ratio:g}x)"
            )
    fb = tallies.get(canary.version) or Tally()
    if fb.scores >= g.min_feedback:
        neg = fb.negatives / fb.scores
        if neg > g.max_negative_feedback:
            return "abort", (
                f"negative feedback {neg:.2f} > {g.max_negative_feedback:g} "
                f"({fb.negatives} of {fb.scores} answers scored)"
            )
    green = canary.elapsed_s(now) >= g.duration_s and cand.requests >= g.min_requests
    if canary.auto_promote and green:
        return "promote", (
            f"green for {canary.elapsed_s(now):.0f}s (>= {g.duration_s:g}s) over "
            f"{cand.requests} candidate requests (all replicas)"
        )
    return None


class AnswerWatch:
    """What one answer says about itself, read from its messages as they pass (nothing is
    buffered): status, id, the model that answered, errors inside a 200 stream, and its
    output tokens."""

    def __init__(self) -> None:
        self.status = 500
        self.fields: dict[str, str] | None = None
        self.stream_error = False
        self.usage: int | None = None
        self.events = 0

    def start(self, status: int) -> None:
        self.status = status

    def body(self, chunk: bytes) -> None:
        if self.fields is None:
            self.fields = answer_fields(chunk)
        if _STREAM_ERROR_RE.search(chunk):
            self.stream_error = True
        usage = _USAGE_RE.findall(chunk)
        if usage:
            self.usage = int(usage[-1])
        self.events += chunk.count(_EVENT)

    @property
    def failed(self) -> bool:
        return self.status >= 500 or self.stream_error

    @property
    def tokens(self) -> int:
        return max(1, self.usage if self.usage is not None else self.events)

    @property
    def answer_id(self) -> str | None:
        return (self.fields or {}).get("id")

    @property
    def model(self) -> str | None:
        return (self.fields or {}).get("model")


def counts_document(
    canary_id: str, replica: str, ts: float, stats: dict[str, VersionStats]
) -> dict[str, Any]:
    """One replica's counters as ``<name>/rollout/counts/<replica>.json`` holds them."""
    versions = {v: s.counts() for v, s in stats.items()}
    return {"canary_id": canary_id, "replica": replica, "ts": ts, "versions": versions}


def parse_counts(document: dict[str, Any]) -> dict[str, VersionStats]:
    """Another replica's counters, per version (malformed versions are left out)."""
    versions = document.get("versions")
    return {
        str(v): parsed
        for v, raw in (versions.items() if isinstance(versions, dict) else [])
        if (parsed := VersionStats.from_counts(raw)) is not None
    }


def summed(parts: Iterable[dict[str, VersionStats]]) -> dict[str, VersionStats]:
    """Per version, the sum of several replicas' counters."""
    out: dict[str, VersionStats] = {}
    for part in parts:
        for version, stats in part.items():
            mine = out.get(version)
            out[version] = stats if mine is None else mine.merge(stats)  # never mutated
    return out
