"""The plugin's Prometheus metrics (``server_plugin.metrics``): named, documented, bounded."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from server_plugin import metrics


def test_every_metric_is_ours_documented_and_registered_once() -> None:
    found = {
        name: m for name, m in vars(metrics).items() if isinstance(m, (Counter, Gauge, Histogram))
    }
    assert len(found) >= 10
    for name, metric in found.items():
        assert metric._name.startswith("agent_finetune_"), name
        assert metric._documentation.endswith((".", ")")), name
        # Labels never carry a client's input: only names, versions and fixed words
        # (reason: the fixed causes of a dropped capture record).
        assert set(metric._labelnames) <= {
            "name",
            "version",
            "role",
            "kind",
            "sign",
            "outcome",
            "reason",
        }
    registered = [n for n in REGISTRY._names_to_collectors if n.startswith("agent_finetune_")]
    assert len(registered) == len(set(registered))
