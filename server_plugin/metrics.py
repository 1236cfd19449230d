"""Prometheus metrics, registered once per process in prometheus_client's default registry.

vLLM's ``/metrics`` serves that registry in the API-server process (single API server;
with ``--api-server-count > 1`` vLLM switches to multiprocess mode and these do not show).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LOADS = Counter(
    "agent_finetune_adapter_loads",
    "Adapter versions loaded into the server (swaps and pinned loads).",
    ["name"],
)
FAILURES = Counter(
    "agent_finetune_adapter_load_failures",
    "Failed loads: kind=permanent (validation, a 4xx refusal; not retried until current "
    "moves) or transient (I/O, 5xx, timeouts; retried with backoff).",
    ["name", "kind"],
)
SWAPS = Counter(
    "agent_finetune_adapter_swaps",
    "Times a public adapter name was repointed to another version.",
    ["name"],
)
SWAP_SECONDS = Histogram(
    "agent_finetune_swap_seconds",
    "Seconds from the registry's current pointer moving to the name serving that version.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LOAD_SECONDS = Histogram(
    "agent_finetune_load_seconds",
    "Seconds to copy, verify, validate and load one adapter version.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LIVE_VERSION = Gauge(
    "agent_finetune_live_version",
    "Version number each adapter name serves (0 when none).",
    ["name"],
)
PINNED = Gauge(
    "agent_finetune_pinned_versions",
    "Versioned names (name@vNNNN) loaded besides the live ones.",
)
REGISTRY_AVAILABLE = Gauge(
    "agent_finetune_registry_available",
    "1 when the registry root is readable and carries its marker; 0 while it is unavailable "
    "(nothing is unloaded then).",
)

# Canary signals: labelled per version only for names with a canary running (bounded).
CANARY_REQUESTS = Counter(
    "agent_finetune_canary_requests",
    "Requests for a name with a canary, by the version that served them and its role.",
    ["name", "version", "role"],
)
CANARY_ERRORS = Counter(
    "agent_finetune_canary_errors",
    "HTTP 5xx answers for a name with a canary, by version and role.",
    ["name", "version", "role"],
)
CANARY_LATENCY = Histogram(
    "agent_finetune_canary_request_seconds",
    "Whole-request seconds (last byte) for a name with a canary, by version.",
    ["name", "version"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CANARY_FEEDBACK = Counter(
    "agent_finetune_canary_feedback",
    "Feedback scores agents posted, by version and sign (negative: score < 0).",
    ["name", "version", "sign"],
)
CANARY_WEIGHT = Gauge(
    "agent_finetune_canary_weight_percent",
    "Share of a name's traffic this server sends to its canary (0: none).",
    ["name"],
)
CANARY_ENDS = Counter(
    "agent_finetune_canary_ends",
    "Canaries this server ended, by outcome (abort, promote).",
    ["name", "outcome"],
)

# Capture (issue 23): labelled by name only for names with capture on (bounded).
CAPTURE_RECORDS = Counter(
    "agent_finetune_capture_records",
    "Captured records written to the registry, by name and kind (exchange, feedback).",
    ["name", "kind"],
)
CAPTURE_DROPPED = Counter(
    "agent_finetune_capture_dropped",
    "Captured records not written, by reason: queue_full (the writer fell behind), "
    "too_large, unparsable, redact_failed, write_failed (e.g. a full disk).",
    ["reason"],
)
