"""Canary state: a candidate version that gets a share of a name's traffic, with guards.

``<root>/<name>/canary`` sits beside ``current``: a small JSON document (candidate version,
the baseline it is compared with, weight in percent, guards, start time, a unique id),
replaced atomically like ``current`` and logged in ``history.jsonl`` (``canary_start``,
``canary_abort``, ``canary_promote``). Every replica that watches the registry reads the
same file, so every replica routes the same share and applies the same guards.

Transitions take the name's lock, like every other write to the name. Ending a canary names
its id: when two replicas trip at once, the first ends it and the second finds nothing to do.

Operators win (``Registry.promote``, ``rollback``, ``publish`` and the gate end a running
canary first), and a verdict is a compare-and-swap: a canary promotes its candidate only if
``current`` is still the baseline it started from; otherwise it ends as an abort and
``CurrentMovedError`` says why.

Standard library only.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent_finetune.errors import CurrentMovedError, InvalidCanaryError, RegistryError
from agent_finetune.registry.files import atomic_write_json
from agent_finetune.registry.history import CANARY_START
from agent_finetune.registry.layout import CANARY
from agent_finetune.registry.names import check_version, utc_now
from agent_finetune.registry.rollout import clear_counts
from agent_finetune.registry.store import Registry

Outcome = Literal["abort", "promote"]

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.ASCII)
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` or a number of seconds -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION_RE.fullmatch(str(text).strip())
        if not m:
            raise InvalidCanaryError(
                f"duration {text!r}: expected a number and a unit, e.g. 90s, 30m, 2h"
            )
        value = float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
    if not math.isfinite(value) or value < 0:
        raise InvalidCanaryError(f"duration {text!r}: must be a finite number of seconds >= 0")
    return value


@dataclass(frozen=True)
class Guards:
    """When a canary is aborted (any guard trips) or may be promoted (none did, for long enough)."""

    min_requests: int = 20
    """Candidate requests (summed over every replica) before the request guards are judged."""
    max_error_rate: float = 0.05
    """Abort when more than this fraction of the candidate's requests fail (HTTP 5xx, an error
    inside a 200 stream, a 404, a transient refusal to load it)."""
    max_latency_ratio: float = 2.0
    """Abort when the candidate's median latency per output token exceeds the baseline's by
    this factor."""
    max_negative_feedback: float = 0.3
    """Abort when more than this fraction of the candidate's feedback scores are negative."""
    min_feedback: int = 5
    """Scored answers of the candidate (one score each) before the feedback guard is judged."""
    duration_s: float = 1800.0
    """Seconds the canary must stay green before it may be promoted."""

    def __post_init__(self) -> None:
        problems = []
        if self.min_requests < 1:
            problems.append(f"min_requests={self.min_requests}: must be >= 1")
        if self.min_feedback < 1:
            problems.append(f"min_feedback={self.min_feedback}: must be >= 1")
        for key in ("max_error_rate", "max_negative_feedback"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                problems.append(f"{key}={value}: must be a fraction in [0, 1]")
        if not self.max_latency_ratio > 0:
            problems.append(f"max_latency_ratio={self.max_latency_ratio}: must be > 0")
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):
            problems.append(f"duration_s={self.duration_s}: must be >= 0")
        if problems:
            raise InvalidCanaryError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Guards:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class Canary:
    """One running canary, as stored in ``<name>/canary``."""

    name: str
    version: str
    baseline: str
    weight: float
    guards: Guards = field(default_factory=Guards)
    auto_promote: bool = False
    started_at: str = ""
    started_ts: float = 0.0
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Canary:
        weight = float(data["weight"])
        if not 0 < weight <= 100:
            raise InvalidCanaryError(f"weight {weight}: must be in (0, 100]")
        return cls(
            name=str(data["name"]),
            version=check_version(str(data["version"])),
            baseline=check_version(str(data["baseline"])),
            weight=weight,
            guards=Guards.from_dict(dict(data.get("guards") or {})),
            auto_promote=bool(data.get("auto_promote", False)),
            started_at=str(data.get("started_at", "")),
            started_ts=float(data.get("started_ts", 0.0)),
            id=str(data["id"]),
        )

    def elapsed_s(self, now: float | None = None) -> float:
        """Seconds since the canary started (wall clock: replicas share it)."""
        return max(0.0, (time.time() if now is None else now) - self.started_ts)


def canary_path(registry: Registry, name: str) -> Path:
    return registry.name_dir(name) / CANARY


def read_canary(registry: Registry, name: str) -> Canary | None:
    """The running canary of ``name``, or None. Raises RegistryError for an unreadable file."""
    path = canary_path(registry, name)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryError(f"{path}: cannot read: {e}") from e
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object")
        return Canary.from_dict(data)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise RegistryError(
            f"{path}: invalid canary state ({type(e).__name__}: {e}); "
            f"run `agent-finetune canary abort {name}` to clear it"
        ) from e


def start_canary(
    registry: Registry,
    name: str,
    version: str,
    *,
    weight: float,
    guards: Guards | None = None,
    auto_promote: bool = False,
    reason: str | None = None,
) -> Canary:
    """Send ``weight`` percent of ``name``'s traffic to ``version`` (checked servable first)."""
    check_version(version)
    if not 0 < weight <= 100:
        raise InvalidCanaryError(f"--weight {weight}: must be a percentage in (0, 100]")
    registry.require_name(name)
    registry.require_servable(name, version, refused="no canary is started")
    with registry.lock(name):
        existing = registry.canary_record(name)
        if existing is not None:
            raise RegistryError(
                f"{name} already has a canary of {existing.get('version')}; "
                f"run `agent-finetune canary abort {name}` or `canary promote {name}` first"
            )
        baseline = registry.current(name)
        if baseline is None:
            raise RegistryError(f"{name} has no current version to compare with; promote one first")
        if baseline == version:
            raise RegistryError(f"{name}@{version} is already current; nothing to canary")
        canary = Canary(
            name=name,
            version=version,
            baseline=baseline,
            weight=float(weight),
            guards=guards or Guards(),
            auto_promote=auto_promote,
            started_at=utc_now(),
            started_ts=time.time(),
            id=uuid.uuid4().hex,
        )
        clear_counts(registry.name_dir(name))  # no other canary's counters are its evidence
        atomic_write_json(canary_path(registry, name), canary.as_dict())
        registry.append_history(
            name,
            {
                "action": CANARY_START,
                "from": baseline,
                "to": version,
                "weight": canary.weight,
                "guards": asdict(canary.guards),
                "auto_promote": auto_promote,
                "canary_id": canary.id,
                "reason": reason,
            },
        )
    return canary


def finish_canary(
    registry: Registry,
    name: str,
    outcome: Outcome,
    *,
    reason: str,
    canary_id: str | None = None,
    evidence: dict[str, Any] | None = None,
) -> Canary | None:
    """Abort the canary (all traffic back to current) or promote its version to current.

    With ``canary_id``, only that canary is ended: a replica acting on what it saw never ends
    a newer canary. Returns the ended canary, or None when there was nothing (left) to end.
    A promotion is a compare-and-swap: if ``current`` is no longer the canary's baseline (an
    operator moved it), or the candidate no longer verifies, the canary is aborted instead
    and the error says why.
    """
    registry.require_name(name)
    with registry.lock(name):
        record = registry.canary_record(name)
        if record is None or (canary_id is not None and record.get("id") != canary_id):
            return None
        try:
            canary = Canary.from_dict(record)
        except (ValueError, KeyError, TypeError) as e:
            if outcome == "promote":
                raise RegistryError(
                    f"{canary_path(registry, name)} is unreadable ({e}); abort it instead"
                ) from e
            registry.end_canary(name, "abort", reason, evidence=evidence)
            return Canary(name, "v0000", "v0000", 100.0, id=str(record.get("id", "unreadable")))
        if outcome == "promote":
            _promote_locked(registry, canary, reason, evidence)
        else:
            registry.end_canary(name, "abort", reason, evidence=evidence)
    return canary


def _promote_locked(
    registry: Registry, canary: Canary, reason: str, evidence: dict[str, Any] | None
) -> None:
    """The canary's verdict, applied only if ``current`` is still its baseline."""
    name = canary.name
    current = registry.current(name)
    try:
        if current != canary.baseline:
            raise CurrentMovedError(
                f"{name}: the canary of {canary.version} was not promoted: current moved from "
                f"{canary.baseline} to {current} after it started (an operator's move wins); "
                "the canary was ended"
            )
        registry.require_servable(name, canary.version, refused="was not promoted")
    except RegistryError as e:
        registry.end_canary(name, "abort", f"not promoted: {e}", evidence=evidence)
        raise
    registry.set_current(
        name, canary.version, "promote", f"canary promoted: {reason}", canary_id=canary.id
    )
    registry.end_canary(name, "promote", reason, evidence=evidence)


def end_canary_of(registry: Registry, name: str, version: str, reason: str) -> bool:
    """End the running canary of ``name`` if its candidate is ``version`` (an operator or the
    gate decided about that version); True when one was ended."""
    with registry.lock(name):
        record = registry.canary_record(name)
        if record is None or record.get("version") != version:
            return False
        registry.end_canary(name, "abort", reason)
    return True
