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


# -- operators win ------------------------------------------------------------------------------
def actions(reg: Registry) -> list[tuple[str, str | None]]:
    return [(e["action"], e.get("to")) for e in reg.history("bot")]


@pytest.mark.parametrize("move", ["promote", "rollback", "publish"])
def test_an_operators_move_ends_the_running_canary_first(
    reg: Registry, tmp_path: Path, move: str
) -> None:
    """Finding: promote, rollback and publish ignored a running canary; it kept routing its
    share, and its auto-promote later reverted the operator's hotfix."""
    c = start_canary(reg, "bot", "v0002", weight=50, auto_promote=True)
    if move == "promote":
        reg.promote("bot", "v0003", reason="hotfix")
        want = "v0003"
    elif move == "rollback":
        reg.promote("bot", "v0001")  # (already current: only the canary ends)
        assert read_canary(reg, "bot") is None
        c = start_canary(reg, "bot", "v0002", weight=50)
        reg.rollback("bot", to="v0003")
        want = "v0003"
    else:
        from helpers import write_adapter

        want = reg.publish("bot", write_adapter(tmp_path / "hotfix", seed=9)).version
    assert read_canary(reg, "bot") is None and reg.current("bot") == want
    end = next(e for e in reversed(reg.history("bot")) if e["action"] == "canary_abort")
    assert end["canary_id"] == c.id and "superseded" in end["reason"]
    assert "operators win" in end["reason"]
    # The canary's late verdict (a replica that saw it green) changes nothing.
    assert finish_canary(reg, "bot", "promote", reason="green", canary_id=c.id) is None
    assert reg.current("bot") == want
    assert [a for a, _ in actions(reg)].count("canary_promote") == 0


def test_a_canary_verdict_is_a_compare_and_swap_of_current(reg: Registry) -> None:
    """A canary whose baseline is no longer current (its end was lost, or a writer moved
    current behind its back) never promotes: it ends as an abort and says why."""
    from helpers import set_current

    from agent_finetune.errors import CurrentMovedError

    c = start_canary(reg, "bot", "v0002", weight=50, auto_promote=True)
    set_current(reg, "bot", "v0003")  # not through promote(): the canary file stays
    with pytest.raises(CurrentMovedError, match="current moved from v0001 to v0003"):
        finish_canary(reg, "bot", "promote", reason="green 30m", canary_id=c.id)
    assert reg.current("bot") == "v0003" and read_canary(reg, "bot") is None
    last = reg.history("bot")[-1]
    assert last["action"] == "canary_abort" and "not promoted" in last["reason"]


def test_canary_promote_writes_the_move_then_the_end(reg: Registry) -> None:
    c = start_canary(reg, "bot", "v0003", weight=50)
    finish_canary(reg, "bot", "promote", reason="green", canary_id=c.id)
    move, end = reg.history("bot")[-2:]
    assert (move["action"], move["to"], move["canary_id"]) == ("promote", "v0003", c.id)
    assert (end["action"], end["canary_id"]) == ("canary_promote", c.id)


def test_gc_never_deletes_a_running_canarys_candidate_or_baseline(reg: Registry) -> None:
    """Finding: `gc --keep 1` deleted the candidate; its share went to 404s, which did not
    count as errors, and the canary promoted."""
    reg.promote("bot", "v0003")
    start_canary(reg, "bot", "v0001", weight=10)
    assert reg.gc("bot", keep=1) == ["v0002"]
    assert reg.versions("bot") == ["v0001", "v0003"]


def test_ending_the_canary_of_an_unknown_name_is_a_clear_error(reg: Registry) -> None:
    """Finding: `canary abort nosuch` raised a raw FileNotFoundError (a traceback)."""
    from agent_finetune.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no adapter named 'nosuch'"):
        finish_canary(reg, "nosuch", "abort", reason="x")
    assert not (reg.root / "nosuch").exists()


def test_starting_a_canary_empties_the_fleet_counters_of_earlier_ones(reg: Registry) -> None:
    from agent_finetune.registry.rollout import read_counts, write_counts

    old = start_canary(reg, "bot", "v0002", weight=10)
    write_counts(reg.name_dir("bot"), "replica-a", {"canary_id": old.id, "versions": {}})
    finish_canary(reg, "bot", "abort", reason="x")
    new = start_canary(reg, "bot", "v0002", weight=10)
    assert read_counts(reg.name_dir("bot"), old.id) == {}
    assert read_counts(reg.name_dir("bot"), new.id) == {}
