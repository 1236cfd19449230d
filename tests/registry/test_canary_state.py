"""Canary state and eval records in the registry: atomic, logged, never in a version folder."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
from helpers import registry_with_versions

from agent_finetune.errors import RegistryError
from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import (
    CANARY,
    Guards,
    finish_canary,
    parse_duration,
    read_canary,
    start_canary,
)
from agent_finetune.registry.eval_records import EVALS, append_eval, latest_eval, read_evals


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 3)


def test_start_status_abort_logged_in_history(reg: Registry) -> None:
    c = start_canary(reg, "bot", "v0002", weight=25, guards=Guards(min_requests=3), reason="try")
    assert (reg.root / "bot" / CANARY).is_file()
    assert read_canary(reg, "bot") == c
    assert c.baseline == "v0001" and c.weight == 25 and c.guards.min_requests == 3
    with pytest.raises(RegistryError, match="already has a canary"):
        start_canary(reg, "bot", "v0003", weight=5)
    ended = finish_canary(reg, "bot", "abort", reason="error rate", canary_id=c.id)
    assert ended == c and read_canary(reg, "bot") is None
    assert reg.current("bot") == "v0001"  # abort never moves current
    actions = [(e["action"], e.get("to"), e.get("reason")) for e in reg.history("bot")]
    assert actions[-2:] == [
        ("canary_start", "v0002", "try"),
        ("canary_abort", "v0002", "error rate"),
    ]
    # A second replica acting on the same canary finds nothing to do, and logs nothing.
    assert finish_canary(reg, "bot", "abort", reason="late", canary_id=c.id) is None
    assert len(reg.history("bot")) == len(actions)


def test_promote_moves_current_and_rollback_still_works(reg: Registry) -> None:
    c = start_canary(reg, "bot", "v0003", weight=50, auto_promote=True)
    stale = start_canary.__name__  # any other id: must not end this canary
    assert finish_canary(reg, "bot", "promote", reason="x", canary_id=stale) is None
    assert finish_canary(reg, "bot", "promote", reason="green 30m", canary_id=c.id) == c
    assert reg.current("bot") == "v0003" and read_canary(reg, "bot") is None
    assert [e["action"] for e in reg.history("bot")][-2:] == ["promote", "canary_promote"]
    assert reg.rollback("bot") == "v0001"


def test_refusals_name_the_fix(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="already current"):
        start_canary(reg, "bot", "v0001", weight=10)
    with pytest.raises(RegistryError, match="not found"):
        start_canary(reg, "bot", "v0009", weight=10)
    with pytest.raises(RegistryError, match="weight"):
        start_canary(reg, "bot", "v0002", weight=0)
    with pytest.raises(ValueError, match="max_error_rate"):
        Guards(max_error_rate=2)
    assert not (reg.root / "bot" / CANARY).exists()


def test_unreadable_canary_file_is_reported_and_can_be_aborted(reg: Registry) -> None:
    (reg.root / "bot" / CANARY).write_text("{not json")
    with pytest.raises(RegistryError, match="canary abort bot"):
        read_canary(reg, "bot")
    assert finish_canary(reg, "bot", "abort", reason="clear") is not None
    assert read_canary(reg, "bot") is None


def _race(root: str, cid: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    q.put(finish_canary(Registry(root), "bot", "abort", reason="race", canary_id=cid) is not None)


def test_two_replicas_aborting_at_once_record_one_abort(reg: Registry) -> None:
    c = start_canary(reg, "bot", "v0002", weight=10)
    q: mp.Queue = mp.get_context("fork").Queue()  # type: ignore[type-arg]
    procs = [
        mp.get_context("fork").Process(target=_race, args=(str(reg.root), c.id, q))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(q.get() for _ in procs) == [False, False, False, True]
    assert [e["action"] for e in reg.history("bot")].count("canary_abort") == 1


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5", 1.5), (0, 0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_refuses_garbage() -> None:
    for bad in ("", "soon", "-5s", "5 weeks"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_eval_records_are_append_only_beside_the_versions(reg: Registry) -> None:
    before = {p: p.read_bytes() for p in (reg.root / "bot" / "versions").rglob("*") if p.is_file()}
    append_eval(reg, "bot", {"version": "v0001", "metrics": {"loglik": -2.0}})
    append_eval(reg, "bot", {"version": "v0002", "metrics": {"loglik": -1.0}, "against": "v0001"})
    append_eval(reg, "bot", {"version": "v0001", "metrics": {"loglik": -1.5}})
    with (reg.root / "bot" / EVALS).open("a") as f:
        f.write('{"torn": \n')  # a torn line never breaks reading
    assert [e["metrics"]["loglik"] for e in read_evals(reg, "bot", "v0001")] == [-2.0, -1.5]
    assert latest_eval(reg, "bot", "v0002")["against"] == "v0001"  # type: ignore[index]
    assert latest_eval(reg, "bot", "v0003") is None
    after = {p: p.read_bytes() for p in (reg.root / "bot" / "versions").rglob("*") if p.is_file()}
    assert after == before  # version folders untouched: checksums stay valid
    assert reg.verify("bot", "v0001").ok
    with pytest.raises(ValueError):
        append_eval(reg, "bot", {"version": "latest"})
    assert all(
        json.loads(line)["user"] for line in (reg.root / "bot" / EVALS).read_text().splitlines()[:3]
    )
