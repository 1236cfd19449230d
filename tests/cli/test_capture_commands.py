"""`capture start|stop|status` and `dataset build`: settings in the registry, rows chosen by
feedback, duplicates removed, and a split that never cuts a conversation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run
from helpers import registry_with_versions
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_finetune.registry import Registry
from agent_finetune.registry.capture import SegmentWriter, capture_dir, read_settings
from agent_finetune.training.capture_dataset import build_rows, conversation_key, normalise
from agent_finetune.training.data import load_dataset_file


@pytest.fixture
def reg(env: Path, tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 1)


def ex(i: int, question: str, answer: str, t: float, first: str | None = None) -> dict[str, object]:
    messages = [{"role": "user", "content": question}]
    if first is not None:  # a later turn of the conversation that began with ``first``
        messages = [
            {"role": "user", "content": first},
            {"role": "assistant", "content": "earlier answer"},
            *messages,
        ]
    return {
        "kind": "exchange",
        "id": f"id-{i}",
        "time": t,
        "version": "v0001",
        "messages": messages,
        "answer": answer,
        "latency_s": 0.1,
        "replica": "a",
    }


def fb(i: int, score: float, correction: str | None = None) -> dict[str, object]:
    return {
        "kind": "feedback",
        "id": f"id-{i}",
        "time": time.time(),
        "score": score,
        "correction": correction,
        "replica": "b",
    }


def test_capture_start_stop_status(reg: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "capture", "start", "bot", "--sample", "0.2", "--max-bytes", "1M")
    assert code == 0 and "20%" in out
    s = read_settings(reg.name_dir("bot"))
    assert s is not None and s.enabled and s.sample == 0.2 and s.max_bytes == 1 << 20
    SegmentWriter(capture_dir(reg.name_dir("bot")), "a").append(
        [ex(1, "q", "a", time.time()), fb(1, 1, "better")]
    )
    code, out, _ = run(capsys, "capture", "status", "--json")
    got = json.loads(out)["names"][0]
    assert code == 0 and got["exchanges"] == 1 and got["rated"] == 1 and got["corrections"] == 1
    assert got["segments"] == 1 and got["bytes"] > 0
    assert run(capsys, "capture", "stop", "bot")[0] == 0
    assert not read_settings(reg.name_dir("bot")).enabled  # type: ignore[union-attr]
    assert "capture_stop" in [h["action"] for h in reg.history("bot")]
    code, _, err = run(capsys, "capture", "start", "bot", "--sample", "3")
    assert code == 1 and "sample" in err
    code, _, err = run(capsys, "capture", "start", "nobody")
    assert code == 1 and "no adapter named" in err


def test_dataset_build_keeps_good_and_corrected_drops_the_rest(
    reg: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    w = SegmentWriter(capture_dir(reg.name_dir("bot")), "a")
    w.append(
        [
            ex(1, "What is 2+2?", "4", now),
            ex(2, "Capital of France?", "Lyon", now),
            ex(3, "Colour of the sky?", "green", now),
            ex(4, "Unrated?", "maybe", now),
            ex(5, "what is 2+2", "4.", now),  # a near duplicate of 1
            ex(6, "Old?", "old", now - 30 * 86400),
            fb(1, 1),
            fb(2, -1, "Paris"),
            fb(3, -1),
            fb(5, 1),
            fb(6, 1),
        ]
    )
    out = tmp_path / "data" / "train.jsonl"
    code, stdout, _ = run(
        capsys, "dataset", "build", "bot", "--out", str(out), "--since", "7d",
        "--include-corrections", "--heldout-share", "0", "--json",
    )  # fmt: skip
    p = json.loads(stdout)
    assert code == 0
    assert p["kept"] == {"rated_good": 1, "corrected": 1}
    assert p["dropped"] == {"negative": 1, "unrated": 1, "near_duplicate": 1}
    rows = load_dataset_file(out).examples  # the training loader takes it as it is
    assert [r.response for r in rows] == ["4", "Paris"]
    assert (tmp_path / "data" / "train.provenance.json").is_file()
    code, stdout, _ = run(capsys, "dataset", "build", "bot", "--out", str(out), "--json")
    assert json.loads(stdout)["dropped"]["correction_not_included"] == 1


@settings(max_examples=25, deadline=None)
@given(
    convs=st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.integers(min_value=1, max_value=4)),
        min_size=1,
        max_size=25,
    ),
    share=st.floats(min_value=0.0, max_value=0.9),
)
def test_the_split_never_cuts_a_conversation_and_is_deterministic(
    tmp_path_factory: pytest.TempPathFactory, convs: list[tuple[str, int]], share: float
) -> None:
    name_dir = tmp_path_factory.mktemp("n")
    w = SegmentWriter(capture_dir(name_dir), "a")
    records: list[dict[str, object]] = []
    i = 0
    for c, (first, turns) in enumerate(convs):
        for turn in range(turns):
            i += 1
            later = None if turn == 0 else first
            question = first if turn == 0 else f"follow-up {c}-{turn}"
            records += [ex(i, question, f"answer {c}-{turn}", float(i), later), fb(i, 1)]
    w.append(records)
    built = build_rows(name_dir, heldout_share=share)
    again = build_rows(name_dir, heldout_share=share)
    assert built.train == again.train and built.heldout == again.heldout
    train = {conversation_key(r["messages"]) for r in built.train}
    held = {conversation_key(r["messages"]) for r in built.heldout}
    assert not train & held
    assert len(built.train) + len(built.heldout) + sum(built.dropped.values()) == i


@given(st.text(max_size=40))
def test_normalise_is_idempotent_and_ignores_case_and_spacing(text: str) -> None:
    n = normalise(text)
    assert normalise(n) == n and normalise(f"  {text.upper()}!! ") == normalise(text.upper())


def test_capture_status_reads_a_servers_drop_counters(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    from fake_plugin_server import FakePluginServer, serving

    counters = {"names": {}, "queued": 3, "written": {"bot": 7}, "dropped": {"queue_full": 2}}
    assert run(capsys, "capture", "start", "bot")[0] == 0
    with serving(FakePluginServer(adapters={"data": [], "capture": counters})) as fake:
        code, out, _ = run(capsys, "capture", "status", "--server", fake.url)
        assert code == 0 and "dropped {'queue_full': 2}" in out and "queued 3" in out
        code, out, _ = run(capsys, "capture", "status", "--server", fake.url, "--json")
    assert json.loads(out)["server"] == counters


def test_merge_corrections_replace_contradicted_rows_only() -> None:
    from agent_finetune.training.capture_dataset import merge_rows, prompt_key

    def row(q: str, a: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    base = [row("Hours?", "Mon-Fri"), row("Returns?", "30 days"), row("Shipping?", "3-5 days")]
    fixed = row("hours", "24/7")
    captured = [fixed, row("Returns?", "30 days"), row("Returns?", "Thirty days, yes")]
    corrections = {prompt_key(fixed): normalise("24/7")}
    rows, counts = merge_rows(base, captured, corrections)
    answers = [r["messages"][-1]["content"] for r in rows]
    assert answers == ["30 days", "3-5 days", "24/7", "Thirty days, yes"]
    assert counts == {"base_replaced": 1, "captured_known": 1, "captured_added": 2}


def test_retrain_needs_a_trained_live_version_and_yes(
    reg: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = ["--work", str(tmp_path / "w")]
    code, _, err = run(capsys, "retrain", "bot", "--yes", *work)
    assert code == 1 and "records no training config" in err  # published by hand, not trained
    code, _, err = run(capsys, "retrain", "nobody", "--yes", *work)
    assert code == 1 and "no adapter named" in err
