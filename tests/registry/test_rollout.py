"""The fleet's shared rollout files: per-replica logs every replica tails, rotation, torn
lines, pruning, and the counters."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent_finetune.registry.rollout import (
    FleetLog,
    clear_counts,
    read_counts,
    replica_id,
    write_counts,
)


def test_each_replica_reads_what_the_others_appended_once(tmp_path: Path) -> None:
    a, b = FleetLog(tmp_path, "a"), FleetLog(tmp_path, "b")
    a.append([{"id": "1"}, {"id": "2"}])
    assert [e["id"] for e in b.tail()] == ["1", "2"]
    assert b.tail() == [] and a.tail() == []  # nothing new; a never reads itself
    b.append([{"id": "3"}])
    a.append([{"id": "4"}])
    assert [e["id"] for e in a.tail()] == ["3"] and [e["id"] for e in b.tail()] == ["4"]


def test_a_line_being_written_waits_and_a_torn_one_is_skipped(tmp_path: Path) -> None:
    a, b = FleetLog(tmp_path, "a"), FleetLog(tmp_path, "b")
    a.append([{"id": "1"}])
    with open(a.own, "ab") as f:
        f.write(b'{"id": "half')  # a writer mid-line (or killed there)
    assert [e["id"] for e in b.tail()] == ["1"]
    a.append([{"id": "2"}])  # the next append seals the torn line first
    assert [e["id"] for e in b.tail()] == ["2"]


def test_rotation_loses_nothing_and_bounds_the_disk(tmp_path: Path) -> None:
    a, b = FleetLog(tmp_path, "a", segment_bytes=200), FleetLog(tmp_path, "b")
    seen = []
    for i in range(60):
        a.append([{"id": f"{i:03d}"}])
        if i % 7 == 0:
            seen += [e["id"] for e in b.tail()]
    seen += [e["id"] for e in b.tail()]
    assert seen == [f"{i:03d}" for i in range(60)]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.1.jsonl", "a.jsonl"] and all(
        (tmp_path / f).stat().st_size <= 200 for f in files
    )
    late = FleetLog(tmp_path, "c")  # a replica starting now reads both segments
    assert [e["id"] for e in late.tail()][-1] == "059"


def test_logs_of_replicas_gone_quiet_are_pruned(tmp_path: Path) -> None:
    a, old = FleetLog(tmp_path, "a"), FleetLog(tmp_path, "old")
    a.append([{"id": "1"}])
    old.append([{"id": "2"}])
    week_ago = time.time() - 8 * 86400
    os.utime(old.own, (week_ago, week_ago))
    a.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_counters_are_per_replica_and_per_canary(tmp_path: Path) -> None:
    write_counts(tmp_path, "a", {"canary_id": "c1", "versions": {"v0001": {}}})
    write_counts(tmp_path, "b", {"canary_id": "c1", "versions": {}})
    write_counts(tmp_path, "c", {"canary_id": "c0", "versions": {}})
    (tmp_path / "rollout" / "counts" / "d.json").write_text("{garbled")
    assert sorted(read_counts(tmp_path, "c1")) == ["a", "b"]
    assert sorted(read_counts(tmp_path, "c1", skip="a")) == ["b"]
    clear_counts(tmp_path)
    assert read_counts(tmp_path, "c1") == {}


def test_replica_ids_are_unique_and_safe_file_names() -> None:
    ids = {replica_id() for _ in range(100)}
    assert len(ids) == 100 and all("/" not in i and not i.startswith(".") for i in ids)
