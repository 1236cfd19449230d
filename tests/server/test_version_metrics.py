"""Per-version series (``server_plugin.version_metrics``): counted from the answers, bounded,
and the Grafana dashboard in the repository asks only for series that exist."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fakes import make_reconciler, run
from helpers import fake_adapter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server_plugin import metrics
from server_plugin.answers import AnswerHeaders
from server_plugin.plugin import loaded_versions
from server_plugin.version_metrics import OTHER, VersionMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "agent-finetune.json"
ROUTE = "/v1/chat/completions"


async def _drain(receive: Any) -> None:
    return None


def send_answer(
    versions: VersionMetrics, model: str | None, chunks: list[bytes], status: int = 200
) -> None:
    """One answer through ``AnswerHeaders`` as vLLM would send it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def describe(model: str) -> str | None:
        return None

    async def send(message: Any) -> None:
        pass

    middleware = AnswerHeaders(app, frozenset({ROUTE}), describe, versions)
    scope = {"type": "http", "method": "POST", "path": ROUTE, "headers": []}
    asyncio.run(middleware(scope, _drain, send))


def body(model: str, prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}
    return json.dumps({"id": "c1", "model": model, "choices": [], "usage": usage}).encode()


def scrape(versions: VersionMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(_Bound(versions))
    return generate_latest(registry).decode()


class _Bound:
    def __init__(self, versions: VersionMetrics) -> None:
        self.versions = versions

    def collect(self) -> Any:
        return self.versions.collect()


def value(text: str, metric: str, **labels: str) -> float | None:
    """The sample of ``metric`` with exactly ``labels`` (None: no such series)."""
    for line in text.splitlines():
        if not line.startswith(f"{metric}{{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("{")[2].partition("}")[0]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_answers_are_counted_by_the_version_that_answered() -> None:
    versions = VersionMetrics()
    send_answer(versions, None, [body("bot@v0002", 11, 7)])
    send_answer(versions, None, [body("bot@v0002", 5, 3)])
    stream = [
        b'data: {"id":"c2","model":"bot@v0001","choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"id":"c2","model":"bot@v0001","choices":[],"usage":{"prompt_tokens":4,'
        b'"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    send_answer(versions, None, stream)
    send_answer(versions, None, [b'data: {"id":"c3","model":"bot@v0001"}\n\n', b'{"error": 1}'])
    send_answer(versions, None, [body("base-model", 1, 1)])  # the base model: not a version
    text = scrape(versions)
    assert value(text, "agent_finetune_version_requests_total", name="bot", version="v0002") == 2
    assert (
        value(text, "agent_finetune_version_prompt_tokens_total", name="bot", version="v0002") == 16
    )
    assert (
        value(text, "agent_finetune_version_completion_tokens_total", name="bot", version="v0002")
        == 10
    )
    assert value(text, "agent_finetune_version_requests_total", name="bot", version="v0001") == 2
    assert (
        value(text, "agent_finetune_version_completion_tokens_total", name="bot", version="v0001")
        == 2
    )
    assert value(text, "agent_finetune_version_errors_total", name="bot", version="v0001") == 1
    assert value(text, "agent_finetune_version_errors_total", name="bot", version="v0002") == 0
    assert "base-model" not in text
    assert versions.in_flight == {}


def test_counters_are_bounded_and_their_sum_stays_exact() -> None:
    """Client traffic must not grow /metrics: at most ``max_versions`` series, the rest
    folded into one, nothing lost."""
    versions = VersionMetrics(max_versions=3)
    for i in range(40):
        send_answer(versions, None, [body(f"n{i % 10}@v0001", 1, 2)])
    text = scrape(versions)
    prefix = "agent_finetune_version_requests_total{"
    series = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(series) == 4  # three versions and the "other" one
    assert sum(float(line.rsplit(" ", 1)[1]) for line in series) == 40
    assert value(text, "agent_finetune_version_requests_total", name=OTHER, version=OTHER)


def test_residency_role_and_load_time_follow_what_the_server_loaded(tmp_path: Path) -> None:
    registry, transport, rec = make_reconciler(tmp_path, max_staged=4)
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    run(rec.reconcile_once())
    versions = VersionMetrics()
    versions.loaded = lambda: loaded_versions(rec)
    versions.on_disk = rec.cache.on_disk
    text = scrape(versions)
    assert value(text, "agent_finetune_version_role", name="x", version="v0001", role="live") == 1
    assert value(text, "agent_finetune_version_role", name="x", version="v0002", role="staged") == 1
    assert value(text, "agent_finetune_version_residency", name="x", version="v0002") == 2
    assert value(text, "agent_finetune_version_load_seconds", name="x", version="v0002") is not None
    answer = versions.answer_started("x@v0001")
    assert answer is not None
    assert (
        value(scrape(versions), "agent_finetune_version_residency", name="x", version="v0001") == 3
    )
    versions.answer_ended(answer, 200)
    del transport.table["x@v0002"]  # lost by the server: not "loaded" any more
    run(rec.served.read_actual())
    text = scrape(versions)
    assert (
        value(text, "agent_finetune_version_role", name="x", version="v0002", role="staged") is None
    )
    assert value(text, "agent_finetune_version_residency", name="x", version="v0002") == 1  # disk


def test_the_live_version_series_exist_only_for_names_that_serve(tmp_path: Path) -> None:
    """At 10,000 lazy names every pass set a live-version series per name (0 for lazy ones)."""
    registry, _, rec = make_reconciler(tmp_path, preload="none")
    for i in range(5):
        registry.publish(f"lazy{i}", fake_adapter(tmp_path / "a", seed=1))
    run(rec.reconcile_once())
    run(rec.ensure("lazy2"))
    run(rec.reconcile_once())
    names = {
        s.labels["name"]
        for m in metrics.LIVE_VERSION.collect()
        for s in m.samples
        if s.labels["name"].startswith("lazy")
    }
    assert names == {"lazy2"}


def exported_metric_names() -> set[str]:
    """Every series name the plugin exports (module metrics and per-version ones)."""
    names: set[str] = set()
    for m in vars(metrics).values():
        if isinstance(m, (Counter, Gauge, Histogram)):
            base = m._name
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    for family in VersionMetrics().collect():
        names |= {family.name, f"{family.name}_total"}
    return names


def test_the_grafana_dashboard_shows_only_series_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"\b(agent_finetune_[a-z_]+)", e)}
    assert used - exported_metric_names() == set()
    assert {
        "agent_finetune_version_residency",
        "agent_finetune_version_requests_total",
        "agent_finetune_version_completion_tokens_total",
        "agent_finetune_version_errors_total",
        "agent_finetune_version_load_seconds",
    } <= used
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles))


@pytest.mark.parametrize("model", ["x@v0001", "x@v0001+0123abcd"])
def test_a_content_variant_counts_as_its_version(model: str) -> None:
    versions = VersionMetrics()
    send_answer(versions, None, [body(model, 1, 1)])
    assert (
        value(scrape(versions), "agent_finetune_version_requests_total", name="x", version="v0001")
        == 1
    )
