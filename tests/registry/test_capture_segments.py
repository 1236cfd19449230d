"""Captured traffic in the registry: settings, segments, rotation, bounds, and the join of
feedback to exchanges across replicas."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_finetune.errors import CaptureError
from agent_finetune.registry.capture import (
    CaptureSettings,
    SegmentWriter,
    capture_dir,
    enforce,
    parse_age,
    parse_size,
    read_capture,
    read_settings,
    segments,
    write_settings,
)


def exchange(i: int, t: float | None = None, replica: str = "a") -> dict[str, object]:
    return {
        "kind": "exchange",
        "id": f"chatcmpl-{i}",
        "time": time.time() if t is None else t,
        "version": "v0001",
        "messages": [{"role": "user", "content": f"question {i}"}],
        "answer": f"answer {i}",
        "latency_s": 0.01,
        "replica": replica,
    }


def feedback(i: int, score: float, t: float, correction: str | None = None) -> dict[str, object]:
    return {
        "kind": "feedback",
        "id": f"chatcmpl-{i}",
        "time": t,
        "score": score,
        "correction": correction,
        "replica": "b",
    }


def test_settings_round_trip_and_bad_values_are_named(tmp_path: Path) -> None:
    assert read_settings(tmp_path) is None
    s = write_settings(tmp_path, CaptureSettings(enabled=True, sample=0.2, redact="m.n:f"))
    assert read_settings(tmp_path) == s and s.updated
    for bad in ({"sample": 2}, {"max_bytes": 10}, {"max_age_s": 0}, {"redact": "nocolon"}):
        with pytest.raises(CaptureError):
            CaptureSettings(**bad)  # type: ignore[arg-type]
    (capture_dir(tmp_path) / "settings.json").write_text('{"enabled": true, "oops": 1}')
    with pytest.raises(CaptureError, match="oops"):
        read_settings(tmp_path)


def test_sizes_and_ages_parse() -> None:
    assert parse_size("1G") == 1 << 30 and parse_size("64k") == 65536 and parse_size("10") == 10
    assert parse_age("30d") == 30 * 86400 and parse_age("2h") == 7200
    with pytest.raises(CaptureError):
        parse_size("lots")
    with pytest.raises(CaptureError):
        parse_age("-1d")


def test_feedback_joins_its_exchange_across_replicas_and_rotated_segments(tmp_path: Path) -> None:
    folder = capture_dir(tmp_path)
    a = SegmentWriter(folder, "a", segment_bytes=400)
    b = SegmentWriter(folder, "b", segment_bytes=400)
    now = time.time()
    for i in range(10):
        a.append([exchange(i, now + i)])
    b.append([feedback(3, -1, now + 20, "the right answer")])
    b.append([feedback(3, 1, now + 10)])  # older: the later score stays
    b.append([feedback(5, 0.5, now + 21)])
    assert len({s.replica for s in segments(folder)}) == 2
    assert sum(s.replica == "a" for s in segments(folder)) > 1  # a rotated
    log = read_capture(tmp_path)
    joined = {e["id"]: f for e, f in log.joined()}
    assert len(joined) == 10
    assert joined["chatcmpl-3"] is not None and joined["chatcmpl-3"]["score"] == -1
    assert joined["chatcmpl-3"]["correction"] == "the right answer"
    assert joined["chatcmpl-5"]["score"] == 0.5 and joined["chatcmpl-1"] is None  # type: ignore[index]
    assert [e["id"] for e, _ in read_capture(tmp_path, since=now + 8).joined()] == [
        "chatcmpl-8",
        "chatcmpl-9",
    ]


def test_torn_and_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = capture_dir(tmp_path)
    w = SegmentWriter(folder, "a")
    w.append([exchange(1)])
    with open(w.current, "ab") as f:
        f.write(b'{"kind": "exchange", "id": "torn')  # killed mid-line
    odd = {**exchange(2), "answer": "line\u2028sep\x85nel"}  # not line ends in JSONL
    w.append([odd, {"kind": "exchange", "id": 5}, {"kind": "other"}])
    log = read_capture(tmp_path)
    assert sorted(log.exchanges) == ["chatcmpl-1", "chatcmpl-2"]
    assert log.exchanges["chatcmpl-2"]["answer"] == "line\u2028sep\x85nel"
    assert log.skipped == 3
    assert w.current.read_bytes().count(b"\n") == 5  # the torn line was sealed, not glued


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=10, max_value=3000), min_size=1, max_size=200),
    max_kib=st.integers(min_value=64, max_value=96),
)
def test_a_flood_keeps_the_folder_under_max_bytes(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], max_kib: int
) -> None:
    folder = capture_dir(tmp_path_factory.mktemp("cap"))
    bound = CaptureSettings(enabled=True, max_bytes=max_kib * 1024)
    w = SegmentWriter(folder, "a", segment_bytes=bound.segment_bytes)
    for i, n in enumerate(sizes):
        w.append([{**exchange(i), "answer": "x" * n}])
        enforce(folder, bound.max_bytes, bound.max_age_s)
        assert sum(s.size for s in segments(folder)) <= bound.max_bytes
    assert read_capture(folder.parent).exchanges  # the newest stay readable


def test_old_segments_age_out(tmp_path: Path) -> None:
    folder = capture_dir(tmp_path)
    SegmentWriter(folder, "old").append([exchange(1)])
    SegmentWriter(folder, "new").append([exchange(2)])
    week = time.time() - 8 * 86400
    os.utime(next(folder.glob("old.*")), (week, week))
    assert enforce(folder, 1 << 30, 7 * 86400) == 1
    assert [s.replica for s in segments(folder)] == ["new"]
    assert json.loads(next(folder.glob("new.*")).read_text())["id"] == "chatcmpl-2"


def test_a_writer_killed_mid_write_leaves_no_torn_record(tmp_path: Path) -> None:
    """kill -9 of a process appending large records: every record read is whole, and the
    next writer's records are read too."""
    import signal
    import subprocess
    import sys

    folder = capture_dir(tmp_path)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from agent_finetune.registry.capture import SegmentWriter\n"
        "w = SegmentWriter(Path(sys.argv[1]), 'victim', segment_bytes=1 << 20)\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    w.append([{'kind': 'exchange', 'id': f'v{i}', 'time': time.time(),\n"
        "               'version': 'v0001', 'messages': [{'role': 'user', 'content': 'q'}],\n"
        "               'answer': 'x' * 200000, 'replica': 'victim'}])\n"
        "    if i == 3:\n"
        "        print('ready', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = read_capture(tmp_path)
    assert len(log.exchanges) >= 3
    assert all(len(e["answer"]) == 200000 for e in log.exchanges.values())
    SegmentWriter(folder, "next").append([exchange(1)])
    assert "chatcmpl-1" in read_capture(tmp_path).exchanges
