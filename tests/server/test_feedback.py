"""Feedback bound to answers: only ids the fleet issued, once each, bounded, from any replica;
the HTTP route caps, parses off the loop and never answers 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import registry_with_versions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_canary_router import Clock, answer, candidate, current, router_for, run_pass

from agent_finetune.errors import FeedbackError, UnknownResponseError
from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import read_canary
from server_plugin import metrics
from server_plugin.canary_router import CanaryRouter
from server_plugin.feedback import (
    FEEDBACK_PATH,
    MAX_BODY_BYTES,
    FeedbackRoute,
    parse_feedback,
)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 2)


def score(router: CanaryRouter, rid: str, value: float, name: str = "bot") -> dict[str, Any]:
    return asyncio.run(router.feedback(name, rid, value))


# -- the body ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "JSON object"),
        ({"score": 1}, '"id"'),
        ({"id": "", "score": 1}, '"id"'),
        ({"id": "x" * 257, "score": 1}, '"id"'),
        ({"id": "a\nb", "score": 1}, '"id"'),
        ({"id": "x", "score": 2}, "-1"),
        ({"id": "x", "score": True}, "-1"),
        ({"id": "x", "score": "1"}, "-1"),
        ({"id": "x", "score": float("nan")}, "-1"),
        ({"id": "x", "score": 0, "model": 3}, "model"),
        ({"id": "x", "score": 0, "version": "v0009"}, "unknown field"),
    ],
)
def test_parse_feedback_refuses_bad_bodies(data: Any, problem: str) -> None:
    with pytest.raises(FeedbackError, match=problem):
        parse_feedback(data)


def test_parse_feedback_accepts_the_documented_shape() -> None:
    assert parse_feedback({"id": "chatcmpl-1", "score": -1}) == ("chatcmpl-1", -1.0)
    assert parse_feedback({"id": "a", "score": 0.5, "model": "bot@v0002"}) == ("a", 0.5)


# -- bound to answers --------------------------------------------------------------------------
def test_feedback_counts_for_the_version_that_answered(reg: Registry) -> None:
    router = router_for(reg, 50, min_feedback=3, max_negative_feedback=0.5)
    answer(router, candidate(router), rid="chatcmpl-1")
    answer(router, current(router), rid="chatcmpl-2")
    assert score(router, "chatcmpl-2", -1)["version"] == "v0001"
    assert score(router, "chatcmpl-1", 1)["version"] == "v0002"
    with pytest.raises(UnknownResponseError):
        score(router, "chatcmpl-unknown", -1)
    answer(router, candidate(router), rid="c-3")
    answer(router, candidate(router), rid="c-4")
    score(router, "c-3", -1)
    assert router.canary("bot") is not None  # 1 of 2 negative: not judged yet
    score(router, "c-4", -0.5)  # 2 of 3 negative > 0.5
    assert router.canary("bot") is None
    run_pass(router)
    assert "negative feedback 0.67" in reg.history("bot")[-1]["reason"]


def test_forged_ids_are_refused_and_labels_never_come_from_the_client(reg: Registry) -> None:
    """Finding: any id was accepted when `model` named a version: five forged negative
    scores aborted any canary, and every distinct `model` became a metrics label."""
    router = router_for(reg, 50, min_feedback=5, max_negative_feedback=0.3)
    for i in range(5):
        with pytest.raises(UnknownResponseError):
            score(router, f"forged-{i}", -1)
    assert router.canary("bot") is not None
    answer(router, current(router), rid="real-1")
    # The body's model is ignored: the score counts for the version that answered.
    route = FeedbackRoute(_Plugin(router))
    status, out = post(route, "bot", {"id": "real-1", "score": 1, "model": "bot@v0002"})
    assert status == 200 and out["version"] == "v0001"


def test_a_flood_of_distinct_ids_and_labels_grows_nothing(reg: Registry) -> None:
    """Finding: 20,000 posts with distinct `model` values made 20,000 stats entries, a 12 MB
    /metrics and a 7.5 MB /v1/adapters."""
    router = router_for(reg, 50, min_feedback=1000)
    answer(router, candidate(router), rid="real")
    before = _label_sets()
    size = len(json.dumps(router.status()))

    async def flood() -> list[Any]:
        results: list[Any] = []
        for batch in range(20):
            posts = [router.feedback("bot", f"flood-{batch}-{i}", -1) for i in range(1000)] + [
                router.feedback(f"name-{batch}-{i}", "real", -1) for i in range(10)
            ]
            results += await asyncio.gather(*posts, return_exceptions=True)
        return results

    results = asyncio.run(flood())
    assert len(results) == 20_200
    assert all(isinstance(r, UnknownResponseError) for r in results)
    assert _label_sets() == before
    assert len(json.dumps(router.status())) <= size + 200
    assert len(router.book._answers) == 1 and len(router.book._scores) == 0
    assert len(router.book._logs) <= 2 and not router._reads
    assert router.canary("bot") is not None
    route = FeedbackRoute(_Plugin(router))  # and through HTTP: 404, whatever the body says
    assert post(route, "bot", {"id": "flood-x", "score": -1, "model": "bot@v0002"})[0] == 404


def test_one_answer_scores_once(reg: Registry) -> None:
    """Finding: 50 replays of one real id hid 20 genuine negatives."""
    router = router_for(reg, 50, min_feedback=5, max_negative_feedback=0.3)
    answer(router, candidate(router), rid="good")
    for _ in range(50):
        score(router, "good", 1)
    tally = router.book.tallies(router.canary("bot").id)["v0002"]  # type: ignore[union-attr]
    assert tally.scores == 1 and tally.total == 1
    for i in range(20):
        answer(router, candidate(router), rid=f"bad-{i}")
    for i in range(20):
        score(router, f"bad-{i}", -1)
    assert router.canary("bot") is None  # tripped at 4 negatives of 5 answers, replays or not
    run_pass(router)
    assert "(4 of 5 answers scored)" in reg.history("bot")[-1]["reason"]
    # A later score replaces the earlier one, never adds.
    router2 = router_for(reg, 50, replica="other", min_feedback=1000)
    answer(router2, candidate(router2), rid="r")
    score(router2, "r", -1)
    assert score(router2, "r", 1)["replaced"] is True
    t = router2.book.tallies(router2.canary("bot").id)["v0002"]  # type: ignore[union-attr]
    assert (t.scores, t.negatives, t.total) == (1, 0, 1.0)


def test_the_stores_are_bounded(reg: Registry) -> None:
    router = router_for(reg, 50, min_feedback=10**6)
    router.book.max_answers = 100
    for i in range(1000):
        answer(router, candidate(router), rid=f"id-{i}")
        score(router, f"id-{i}", 1)
    assert len(router.book._answers) == 100 and len(router.book._scores) == 100
    with pytest.raises(UnknownResponseError):
        score(router, "id-0", 1)  # the oldest went first


# -- across replicas ---------------------------------------------------------------------------
def test_a_score_may_arrive_at_another_replica(reg: Registry) -> None:
    """Answered by replica A, scored at B: B finds the id in A's log, counts it for the
    version A recorded, and A counts it too after its next pass; a replay at A replaces."""
    a = router_for(reg, 50, replica="a", min_feedback=1000)
    b = router_for(reg, 50, replica="b", start=False)
    answer(a, candidate(a), rid="from-a")
    run_pass(a)  # a writes its answers to the fleet's log
    assert score(b, "from-a", -1)["version"] == "v0002"
    run_pass(b)
    run_pass(a)
    cid = a.canary("bot").id  # type: ignore[union-attr]
    assert a.book.tallies(cid)["v0002"].negatives == 1
    score(a, "from-a", 1)
    run_pass(a)
    run_pass(b)
    for r in (a, b):
        t = r.book.tallies(cid)["v0002"]
        assert (t.scores, t.negatives) == (1, 0), r.replica
    assert (reg.root / "bot" / "rollout" / "responses" / "a.jsonl").is_file()


def test_an_id_issued_elsewhere_is_found_without_waiting_for_a_pass(reg: Registry) -> None:
    a = router_for(reg, 50, replica="a")
    b = router_for(reg, 50, replica="b", start=False)
    run_pass(b)  # b knows the name's log already
    answer(a, candidate(a), rid="fresh")
    run_pass(a)
    assert score(b, "fresh", 1)["version"] == "v0002"  # read at once on the miss


def test_feedback_after_the_canary_ended_is_recorded_not_counted(reg: Registry) -> None:
    from agent_finetune.registry.canary_state import finish_canary

    router = router_for(reg, 50)
    answer(router, candidate(router), rid="late")
    finish_canary(reg, "bot", "abort", reason="by hand")
    run_pass(router)
    out = score(router, "late", -1)
    assert out["recorded"] and not out["counted"]


# -- the HTTP route ----------------------------------------------------------------------------
class _Plugin:
    def __init__(self, canary: CanaryRouter | None) -> None:
        self.canary, self.error = canary, None


def post(route: FeedbackRoute, name: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.add_api_route(FEEDBACK_PATH, route.post, methods=["POST"])
    with TestClient(app) as client:
        data = raw if raw is not None else json.dumps(body).encode()
        r = client.post(f"/v1/adapters/{name}/feedback", content=data)
    return r.status_code, r.json()


def _label_sets() -> int:
    return sum(len(m.collect()[0].samples) for m in (metrics.CANARY_FEEDBACK,))


def test_the_route_answers_400_413_404_never_500(reg: Registry) -> None:
    router = router_for(reg, 50)
    route = FeedbackRoute(_Plugin(router))
    assert post(route, "bot", None, raw=b"{not json")[0] == 400
    deep = b'{"id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    status, out = post(route, "bot", None, raw=deep)
    assert status == 400 and "nests deeper" in out["error"]["message"]
    status, out = post(route, "bot", None, raw=b" " * (MAX_BODY_BYTES + 1))
    assert status == 413 and out["error"]["type"] == "RequestTooLargeError"
    assert post(route, "bot", {"id": "nope", "score": 1})[0] == 404
    assert post(route, "Not A Name", {"id": "nope", "score": 1})[0] == 404
    assert post(FeedbackRoute(_Plugin(None)), "bot", {"id": "x", "score": 1})[0] == 503


def test_the_body_is_parsed_off_the_event_loop(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: a 60 MB body was read whole and parsed on the event loop (a 5 s stall)."""
    import server_plugin.feedback as module

    router = router_for(reg, 50)
    answer(router, candidate(router), rid="r1")
    threads: list[str] = []
    real = module.json.loads

    def loads(data: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(module.json, "loads", loads)
    assert post(FeedbackRoute(_Plugin(router)), "bot", {"id": "r1", "score": 1})[0] == 200
    assert threads and threads[0] != threading.main_thread().name
    assert "asyncio" in threads[0] or "ThreadPool" in threads[0]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )
)
def test_any_json_body_is_a_clear_answer(reg: Registry, data: Any) -> None:
    """Hypothesis: whatever JSON arrives, the answer is 200, 400 or 404, never a crash."""
    if str(reg.root) not in _routers:  # one router for all examples of this run
        _routers[str(reg.root)] = router_for(reg, 50, clock=Clock(0))
    router = _routers[str(reg.root)]
    assert read_canary(reg, "bot") is not None
    try:
        rid, value = parse_feedback(data)
    except FeedbackError:
        return
    with contextlib.suppress(UnknownResponseError):
        score(router, rid, value)


_routers: dict[str, CanaryRouter] = {}


def test_answers_reach_the_fleets_log_in_batches_not_per_pass(reg: Registry) -> None:
    router = router_for(reg, 50)
    log = reg.root / "bot" / "rollout" / "responses" / f"{router.replica}.jsonl"

    async def scenario() -> bool:
        task = asyncio.ensure_future(router.run(resync_s=60))  # one pass now, the next in 60 s
        await asyncio.sleep(0.2)
        for i in range(5):
            answer_in_loop(router, f"batched-{i}")
        await asyncio.sleep(0.5)
        written = log.is_file() and log.read_text().count("batched-") == 5
        task.cancel()
        return written

    assert asyncio.run(scenario())


def answer_in_loop(router: CanaryRouter, rid: str) -> None:
    from server_plugin.canary_signals import AnswerWatch

    watch = AnswerWatch()
    watch.start(200)
    watch.body(json.dumps({"id": rid, "model": "bot@v0002"}).encode())
    router.record(candidate(router), watch, 0.1)


def test_an_unwritable_rollout_folder_is_reported_once_not_every_pass(
    reg: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from agent_finetune.errors import RegistryError
    from agent_finetune.registry.rollout import FleetLog

    def read_only(self: Any, entries: Any) -> None:
        raise RegistryError("cannot append to responses: read-only (errno 30 EROFS)")

    monkeypatch.setattr(FleetLog, "append", read_only)
    router = router_for(reg, 50)
    for i in range(3):
        answer(router, candidate(router), rid=f"r-{i}")
        run_pass(router)
    assert "cannot record responses" in router.status()["errors"]["bot"]
    assert sum("cannot record responses" in r.message for r in caplog.records) == 1
    assert score(router, "r-0", 1)["recorded"]  # this replica still knows its answers


def test_a_score_posted_the_moment_another_replica_answered_is_found(reg: Registry) -> None:
    """The answer is recorded before its client has it, and written to the fleet's log in
    a batch moments later: a score posted at once to another replica waits for that write
    instead of answering 404 (the live two-replica test caught the race)."""
    a = router_for(reg, 50, replica="a")
    b = router_for(reg, 50, replica="b", start=False)

    async def scenario() -> dict[str, Any]:
        tasks = [asyncio.ensure_future(r.run(resync_s=60)) for r in (a, b)]
        await asyncio.sleep(0.3)  # both ran their first pass
        answer_in_loop(a, "just-now")
        try:
            return await b.feedback("bot", "just-now", -1)
        finally:
            for t in tasks:
                t.cancel()

    assert asyncio.run(scenario())["version"] == "v0002"
