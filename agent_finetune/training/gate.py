"""The promotion gate: a version becomes current only if it beats the live one.

``evaluate_versions`` scores versions on held-out rows (through a server, or offline with
PEFT) and stores one record per version in the registry (``registry.eval_records``); ``gate``
compares candidate and live row by row and promotes only when the bootstrap confidence
interval of the mean gain lies above ``min_delta``, on at least ``min_rows`` rows whose
scores are all finite.

The decision goes into history with both scores, the win rate and the interval: a refusal
as a ``gate`` entry, a promotion in the ``promote`` entry of the move itself (``gate``
field), written together. The move is a compare-and-swap: it happens only if ``current`` is
still the version the evaluation compared with (``CurrentMovedError`` otherwise: nothing
moves), and, like any operator's promote, it ends a running canary first. A refusal of the
version a canary is trying ends that canary too: the operator's gate has spoken.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_finetune.errors import CurrentMovedError, EvalError
from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import end_canary_of
from agent_finetune.registry.eval_records import append_eval
from agent_finetune.registry.names import model_id
from agent_finetune.training.data import Dataset, load_dataset_file
from agent_finetune.training.evaluate import (
    Comparison,
    EvalResult,
    Metric,
    ServerEvaluator,
    compare_scores,
    evaluate_offline,
    is_better,
)


@dataclass
class GateResult:
    """What the gate decided and why."""

    name: str
    candidate: str
    live: str | None
    metric: Metric
    min_delta: float
    promoted: bool
    reason: str
    comparison: Comparison | None = None
    results: dict[str, EvalResult] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "candidate": self.candidate,
            "live": self.live,
            "metric": self.metric,
            "min_delta": self.min_delta,
            "promoted": self.promoted,
            "reason": self.reason,
            "comparison": self.comparison.as_dict() if self.comparison else None,
            "means": {v: r.means() for v, r in self.results.items()},
        }


def evaluate_versions(
    registry: Registry,
    name: str,
    versions: list[str],
    dataset: Dataset,
    *,
    server: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    base_model: str | None = None,
    against: str | None = None,
    record: bool = True,
    generate: bool = True,
) -> dict[str, EvalResult]:
    """Score each ``name@version`` on ``dataset``; append one eval record per version.

    With ``server``, through that server (pinned names, so a canary never interferes);
    else offline with PEFT on ``base_model`` (default: the manifest's base model), where
    ``generate=False`` scores loglik only (no generation: fast on a CPU).
    """
    for v in versions:
        if v not in registry.versions(name):
            raise EvalError(f"{name}@{v} not found in {registry.root}")
    results: dict[str, EvalResult] = {}
    if server:
        evaluator = ServerEvaluator(
            server, api_key=api_key, max_tokens=max_tokens, temperature=temperature
        )
        try:
            for v in versions:
                results[v] = evaluator.evaluate(model_id(name, v), dataset.examples)
        finally:
            evaluator.close()
        via = server
    else:
        base = base_model or str(registry.manifest(name, versions[0]).get("base_model") or "")
        if not base:
            raise EvalError(f"{name}@{versions[0]}: manifest names no base model; pass one")
        folders = {v: registry.version_dir(name, v) for v in versions}
        results = evaluate_offline(
            base, folders, dataset.examples, max_tokens=max_tokens, generate=generate
        )
        via = f"offline (PEFT on {base})"
    if record:
        for v, r in results.items():
            append_eval(
                registry,
                name,
                {
                    "version": v,
                    "data": dataset.describe(),
                    "via": via,
                    "settings": {"max_tokens": max_tokens, "temperature": temperature},
                    "metrics": r.means(),
                    "against": against if v != against else None,
                },
            )
    return results


MIN_ROWS = 10
"""Held-out rows the gate needs at least: a bootstrap interval over fewer says little."""


def gate(
    registry: Registry,
    name: str,
    candidate: str,
    data: str | os.PathLike[str] | Dataset,
    *,
    metric: Metric = "loglik",
    min_delta: float = 0.0,
    min_rows: int = MIN_ROWS,
    server: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 128,
    base_model: str | None = None,
    seed: int = 0,
) -> GateResult:
    """Promote ``name@candidate`` only if it beats the current version on ``data``."""
    dataset = data if isinstance(data, Dataset) else load_dataset_file(Path(data))
    live = registry.current(name)
    if candidate not in registry.versions(name):
        raise EvalError(f"{name}@{candidate} not found in {registry.root}")
    if live == candidate:
        return GateResult(name, candidate, live, metric, min_delta, False, "already current")
    if live is None:
        reason = "no live version to compare with"
        _promote(registry, name, candidate, None, reason, {"decision": "promote", "metric": metric})
        return GateResult(name, candidate, None, metric, min_delta, True, reason)
    if len(dataset.examples) < min_rows:
        raise EvalError(
            f"{dataset.describe().get('path', 'the held-out data')} has "
            f"{len(dataset.examples)} rows; the gate needs at least {min_rows} to judge "
            "(add held-out rows, or lower --min-rows knowingly)"
        )
    results = evaluate_versions(
        registry,
        name,
        [candidate, live],
        dataset,
        server=server,
        api_key=api_key,
        max_tokens=max_tokens,
        base_model=base_model,
        against=live,
        generate=metric != "loglik",
    )
    decided = decide(results, candidate, live, metric, min_delta, seed)
    promoted, reason, comparison = decided
    entry = {
        "decision": "promote" if promoted else "refuse",
        "metric": metric,
        "min_delta": min_delta,
        "data": dataset.describe(),
        "via": server or "offline",
        "comparison": comparison.as_dict() if comparison else None,
    }
    if promoted:
        _promote(registry, name, candidate, live, f"gate: {reason}", entry)
    else:
        _refuse(registry, name, candidate, live, reason, entry)
    return GateResult(
        name, candidate, live, metric, min_delta, promoted, reason, comparison, results
    )


def decide(
    results: dict[str, EvalResult],
    candidate: str,
    live: str,
    metric: Metric,
    min_delta: float,
    seed: int,
) -> tuple[bool, str, Comparison | None]:
    """(promote?, why, the comparison): refused outright when a row scored NaN or infinity,
    since no order of such rows means anything."""
    bad = {
        v: [i + 1 for i, x in enumerate(results[v].scores[metric]) if not math.isfinite(x)]
        for v in (candidate, live)
    }
    if any(bad.values()):
        where = "; ".join(f"{v} rows {rows}" for v, rows in bad.items() if rows)
        return False, f"not comparable: non-finite {metric} scores ({where})", None
    comparison = compare_scores(
        results[candidate].scores[metric], results[live].scores[metric], metric=metric, seed=seed
    )
    ci = f"{comparison.confidence:.0%} CI [{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}]"
    summary = (
        f"{metric} {comparison.candidate:.4f} vs {comparison.live:.4f} "
        f"(gain {comparison.delta:+.4f}, {ci}, win rate {comparison.win_rate:.0%}, "
        f"min delta {min_delta:g}, {comparison.rows} rows)"
    )
    promoted = is_better(comparison, min_delta)
    return promoted, summary if promoted else f"not better: {summary}", comparison


def _promote(
    registry: Registry,
    name: str,
    candidate: str,
    live: str | None,
    reason: str,
    entry: dict[str, Any],
) -> None:
    """The gate's move, a compare-and-swap: only if ``live`` is still current."""
    try:
        registry.promote(name, candidate, reason=reason, expect=live, gate=entry)
    except CurrentMovedError as e:
        registry.log_event(
            name,
            "gate",
            **{"from": live, "to": candidate},
            **{**entry, "decision": "stale"},
            reason=f"evaluated against {live}, but current moved meanwhile; nothing promoted",
        )
        raise CurrentMovedError(f"{e}; run the gate again against the new current") from e


def _refuse(
    registry: Registry,
    name: str,
    candidate: str,
    live: str,
    reason: str,
    entry: dict[str, Any],
) -> None:
    """A refusal ends the candidate's canary first (if one runs), then is logged."""
    end_canary_of(registry, name, candidate, f"superseded: the gate refused {candidate}")
    registry.log_event(name, "gate", **{"from": live, "to": candidate}, **entry, reason=reason)
