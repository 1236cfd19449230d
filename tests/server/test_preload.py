"""The preload policy and the usage record (``server_plugin.preload``). The loads of lazy
names themselves: test_demand.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fakes import make_reconciler
from helpers import fake_adapter
from hypothesis import given
from hypothesis import strategies as st

from agent_finetune.errors import ConfigError
from agent_finetune.registry.names import NAME_RE
from server_plugin.preload import PreloadPolicy, Usage
from server_plugin.reconciler import Reconciler
from server_plugin.settings import Settings


def named(tmp: Path, n_names: int, **kw: Any) -> Reconciler:
    """A reconciler on ``n_names`` names (n00, n01, ...) of one adapter."""
    registry, _, rec = make_reconciler(tmp, **kw)
    source = fake_adapter(tmp / "adapter", seed=1)
    for i in range(n_names):
        registry.publish(f"n{i:02d}", source)
    return rec


def states(rec: Reconciler) -> dict[str, str]:
    return {a["name"]: a["state"] for a in rec.status()["data"]}


def test_auto_preloads_all_while_names_fit_then_the_most_recent(tmp_path: Path) -> None:
    rec = named(tmp_path, 6, preload="auto", engine_bound=10, max_pinned=4)
    asyncio.run(rec.reconcile_once())
    assert str(rec.policy) == "all" and not rec.lazy
    assert set(states(rec).values()) == {"live"}

    usage = Usage(tmp_path / "usage.json")
    usage.used_at = {"n04": 200.0, "n01": 100.0}
    rec = named(tmp_path / "more", 9, preload="auto", engine_bound=7, max_pinned=4, usage=usage)
    asyncio.run(rec.reconcile_once())
    # 9 names do not fit 7 - 4 = 3: recent:3 = the two used ones, then the newest pointer.
    assert str(rec.policy) == "recent:3"
    assert sorted(n for n, s in states(rec).items() if s == "live") == ["n01", "n04", "n08"]


def test_usage_record_survives_a_restart_and_merges(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    a, b = Usage(path), Usage(path)
    a.touch("x")
    a.save(force=True)
    b.touch("y")
    b.save(force=True)
    assert set(Usage(path).used_at) == {"x", "y"}
    path.write_text("not json")
    assert Usage(path).used_at == {}


@given(
    st.one_of(
        st.sampled_from(["all", "none", "auto"]),
        st.integers(0, 10_000).map(lambda n: f"recent:{n}"),
        st.lists(st.from_regex(NAME_RE, fullmatch=True), min_size=1, max_size=4).map(",".join),
    )
)
def test_policy_round_trips(value: str) -> None:
    assert str(PreloadPolicy.parse(value)) == value


@pytest.mark.parametrize("bad", ["recent:", "recent:-1", "recent:x", "Bad Name", ",", "a,B"])
def test_bad_policy_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"expected"):
        PreloadPolicy.parse(bad)
    with pytest.raises(ConfigError, match=r"AGENT_FINETUNE_PRELOAD=.*\(or --preload\): .*expected"):
        Settings.from_env({"AGENT_FINETUNE_PRELOAD": bad})


def test_recent_ranks_by_use_then_by_pointer_move_then_by_name() -> None:
    policy = PreloadPolicy("recent", count=3)
    moved = {"a": 1.0, "b": 5.0, "c": None, "d": 5.0, "e": 2.0}
    assert policy.choose(moved, {"e": 100.0}) == frozenset({"e", "b", "d"})
    assert PreloadPolicy("none").choose(moved, {}) == frozenset()
    assert PreloadPolicy("all").choose(moved, {}) is None
    assert PreloadPolicy("auto").resolve(5, 5) == PreloadPolicy("all")
    assert PreloadPolicy("auto").resolve(6, 5) == PreloadPolicy("recent", 5)
