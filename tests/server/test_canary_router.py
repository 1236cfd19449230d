"""The plugin's canary router without vLLM: split, stickiness, rewrite, guards over the
fleet, stale canaries, and the request middleware that drives it."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import registry_with_versions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import Guards, read_canary, start_canary
from server_plugin.canary_router import CanaryRouter, Route
from server_plugin.canary_signals import sticky_draw
from server_plugin.failures import Refusal as PinRefusal
from server_plugin.middleware import ModelRequestMiddleware


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 2)


def router_for(
    reg: Registry,
    weight: float = 20,
    clock: Clock | None = None,
    replica: str = "replica-a",
    start: bool = True,
    **guards: Any,
) -> CanaryRouter:
    if start:
        start_canary(reg, "bot", "v0002", weight=weight, guards=Guards(**guards), auto_promote=True)
    router = CanaryRouter(reg, rng=random.Random(7), clock=clock or Clock(0), replica=replica)
    router.refresh()
    return router


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "bot", "messages": [{"role": "user", "content": "hi"}], **fields}


def answer(
    router: CanaryRouter,
    route: Route,
    *,
    status: int = 200,
    seconds: float = 0.1,
    answered: str | None = None,
    rid: str | None = None,
    tokens: int = 10,
    chunks: list[bytes] | None = None,
) -> None:
    """One request through ``wrap_send``: the answer names ``answered`` (default: the
    route's version) and carries usage of ``tokens`` output tokens."""
    model = answered or f"{route.name}@{route.version}"
    head = {"id": rid or "x", "model": model, "usage": {"completion_tokens": tokens}}
    messages = chunks or [json.dumps(head).encode()]
    clock = {"t": 0.0}

    async def send(message: Any) -> None:
        pass

    async def scenario() -> None:
        wrapped, finish = router.wrap_send(route, send, 0.0)
        await wrapped({"type": "http.response.start", "status": status, "headers": []})
        for i, chunk in enumerate(messages):
            more = i + 1 < len(messages)
            await wrapped({"type": "http.response.body", "body": chunk, "more_body": more})
        finish()

    import server_plugin.canary_router as module

    real = module.time.perf_counter
    module.time.perf_counter = lambda: clock["t"] + seconds  # type: ignore[assignment]
    try:
        asyncio.run(scenario())
    finally:
        module.time.perf_counter = real  # type: ignore[assignment]


def candidate(router: CanaryRouter) -> Route:
    c = router.canary("bot")
    assert c is not None
    return Route("bot", c.version, True, c.id)


def current(router: CanaryRouter) -> Route:
    c = router.canary("bot")
    assert c is not None
    return Route("bot", c.baseline, False, c.id)


def run_pass(router: CanaryRouter) -> None:
    asyncio.run(router.pass_once())


# -- the split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [1, 10, 50, 90])
def test_random_split_matches_the_weight(reg: Registry, weight: float) -> None:
    router = router_for(reg, weight)
    n = 10_000
    hits = sum(router.choose("bot", None).candidate for _ in range(n))  # type: ignore[union-attr]
    assert abs(hits / n * 100 - weight) < 2


def test_sticky_users_stay_on_one_side_and_spread_by_weight(reg: Registry) -> None:
    router = router_for(reg, 30)
    sides = {}
    for u in range(2000):
        first = router.choose("bot", f"user-{u}")
        assert first is not None
        assert all(router.choose("bot", f"user-{u}") == first for _ in range(3))
        sides[u] = first.candidate
    assert abs(sum(sides.values()) / len(sides) - 0.3) < 0.04


@settings(max_examples=200)
@given(st.text(min_size=1), st.text(min_size=1))
def test_sticky_draw_is_uniform_range_and_deterministic(cid: str, key: str) -> None:
    x = sticky_draw(cid, key)
    assert 0 <= x < 1 and x == sticky_draw(cid, key)


def test_route_and_pin_keep_every_other_field(reg: Registry) -> None:
    router = router_for(reg, 100)
    data = body(user="alice", max_tokens=7, temperature=0)
    route = router.route(data, [])
    assert route == Route("bot", "v0002", True, router.canary("bot").id)  # type: ignore[union-attr]
    pinned = router.pinned(data, route)
    assert pinned == {**data, "model": "bot@v0002"}
    assert router.route({"model": "someone-else"}, []) is None
    assert router.route({"model": 3}, []) is None


def test_session_header_makes_it_sticky(reg: Registry) -> None:
    router = router_for(reg, 50)
    headers = [(b"x-session-id", b"conversation-42")]
    assert len({router.route(body(), headers) for _ in range(50)}) == 1


# -- guards ------------------------------------------------------------------------------------
def test_error_guard_aborts_locally_at_once_then_in_the_registry(reg: Registry) -> None:
    router = router_for(reg, 50, min_requests=5, max_error_rate=0.2)
    for status in (200, 200, 500, 200):
        answer(router, candidate(router), status=status)
    assert router.canary("bot") is not None  # 4 < min_requests: not judged yet
    answer(router, candidate(router), status=500)  # 2 of 5 = 0.4 > 0.2
    assert router.canary("bot") is None
    assert all(not router.choose("bot", None) for _ in range(100))  # 100% current, now
    run_pass(router)
    assert read_canary(reg, "bot") is None
    last = reg.history("bot")[-1]
    assert last["action"] == "canary_abort" and "error rate 0.400 > 0.2" in last["reason"]
    assert last["evidence"]["versions"]["v0002"]["errors"] == 2
    assert reg.current("bot") == "v0001"


def test_an_error_inside_a_200_stream_is_an_error(reg: Registry) -> None:
    """Finding: the error guard counted HTTP >= 500 only; vLLM reports a failure in the
    middle of a stream as an in-band `data: {"error": ...}` event inside a 200."""
    router = router_for(reg, 50, min_requests=2, max_error_rate=0.4)
    stream = [
        b'data: {"id":"chatcmpl-1","model":"bot@v0002","choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"error": {"message": "Internal server error", "type": "InternalServerError"'
        b', "param": null, "code": 500}}\n\n',
        b"data: [DONE]\n\n",
    ]
    answer(router, candidate(router), chunks=stream)
    answer(router, candidate(router), chunks=stream)
    assert router.canary("bot") is None
    run_pass(router)
    assert "error rate 1.000" in reg.history("bot")[-1]["reason"]


def test_the_candidates_404s_count_as_errors(reg: Registry) -> None:
    """Finding: a candidate gone from the registry answered 404s, which did not count, so
    the verdict became promote."""
    router = router_for(reg, 50, min_requests=3, max_error_rate=0.1)
    for _ in range(3):
        answer(router, candidate(router), status=404, answered="none")
    assert router.canary("bot") is None
    run_pass(router)
    assert reg.history("bot")[-1]["action"] == "canary_abort"


def test_latency_is_judged_per_output_token(reg: Registry) -> None:
    """Finding: the latency guard compared whole-request seconds, so a client asking the
    candidate for longer answers (max_tokens) tripped it."""
    router = router_for(reg, 50, min_requests=3, max_latency_ratio=2.0)
    for _ in range(3):
        answer(router, current(router), seconds=0.10, tokens=10)
        answer(router, candidate(router), seconds=0.40, tokens=40)  # 4x longer, same pace
    assert router.canary("bot") is not None
    for _ in range(4):
        answer(router, candidate(router), seconds=0.40, tokens=10)  # 4x slower per token
    assert router.canary("bot") is None
    run_pass(router)
    assert "median latency per output token" in reg.history("bot")[-1]["reason"]


def test_streamed_answers_without_usage_count_their_events(reg: Registry) -> None:
    router = router_for(reg, 50)
    events = [b'data: {"id":"c1","model":"bot@v0002","choices":[]}\n\n'] + [
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    ] * 9
    answer(router, candidate(router), seconds=1.0, chunks=events)
    p50 = router.status()["names"]["bot"]["versions"]["v0002"]["p50_token_s"]
    assert 0.09 < p50 < 0.11  # 1 s over 10 events


def test_auto_promote_after_green_duration_with_enough_requests(reg: Registry) -> None:
    clock = Clock(0)
    router = router_for(reg, 50, clock=clock, min_requests=2, duration_s=60)
    c = router.canary("bot")
    assert c is not None
    clock.now = c.started_ts + 61
    run_pass(router)
    assert router.canary("bot") is not None  # no evidence yet: this replica does not promote
    for _ in range(2):
        answer(router, candidate(router))
    run_pass(router)
    assert reg.current("bot") == "v0002" and read_canary(reg, "bot") is None
    assert reg.history("bot")[-1]["action"] == "canary_promote"


# -- counted for who answered ------------------------------------------------------------------
def test_requests_count_for_the_version_that_answered(reg: Registry) -> None:
    """Finding: a crafted body was counted as a candidate request while current answered."""
    router = router_for(reg, 50, min_requests=1000)
    answer(router, candidate(router), answered="bot@v0001")
    versions = router.status()["names"]["bot"]["versions"]
    assert versions["v0001"]["requests"] == 1 and "v0002" not in versions


# -- the fleet ---------------------------------------------------------------------------------
def test_guards_judge_the_sum_over_replicas(reg: Registry) -> None:
    """Finding: guards were judged per replica: one replica promoted while another saw 47%
    errors below min_requests (23% fleet-wide against a 5% limit)."""
    a = router_for(reg, 50, replica="a", min_requests=10, max_error_rate=0.05)
    b = router_for(reg, 50, replica="b", start=False)
    for i in range(8):
        answer(a, candidate(a), status=500 if i < 2 else 200)  # 2 of 8: under min_requests
        answer(b, candidate(b), status=500 if i < 2 else 200)
    assert a.canary("bot") is not None and b.canary("bot") is not None
    run_pass(a)  # a writes its counters
    run_pass(b)  # b reads them: 4 errors of 16 fleet-wide
    assert b.canary("bot") is None
    run_pass(b)
    last = reg.history("bot")[-1]
    assert last["action"] == "canary_abort" and "4 of 16 candidate requests" in last["reason"]
    run_pass(a)
    assert a.canary("bot") is None  # every replica drops it


def test_auto_promote_counts_the_fleets_requests(reg: Registry) -> None:
    clock = Clock(0)
    a = router_for(reg, 50, clock=clock, replica="a", min_requests=4, duration_s=1)
    b = router_for(reg, 50, clock=clock, replica="b", start=False)
    clock.now = a.canary("bot").started_ts + 5  # type: ignore[union-attr]
    for router in (a, a, b, b):
        answer(router, candidate(router))
    run_pass(a)
    assert reg.current("bot") == "v0001"  # 2 requests here, 0 known from b
    run_pass(b)  # 2 here + 2 from a
    assert reg.current("bot") == "v0002"
    assert [e["action"] for e in reg.history("bot")].count("canary_promote") == 1


# -- stale canaries ----------------------------------------------------------------------------
def test_a_canary_whose_candidate_left_the_registry_ends(reg: Registry) -> None:
    import shutil

    router = router_for(reg, 50)
    shutil.rmtree(reg.version_dir("bot", "v0002"))
    run_pass(router)
    assert router.canary("bot") is None and read_canary(reg, "bot") is None
    assert "left the registry" in reg.history("bot")[-1]["reason"]


def test_a_canary_whose_baseline_is_no_longer_current_ends(reg: Registry) -> None:
    from helpers import set_current

    router = router_for(reg, 50, min_requests=1, duration_s=0)
    set_current(reg, "bot", "v0002")  # a writer moved current behind the canary's back
    router.refresh()
    assert router.canary("bot") is None  # never routed or promoted again
    run_pass(router)
    assert read_canary(reg, "bot") is None and reg.current("bot") == "v0002"
    assert "current moved under it" in reg.history("bot")[-1]["reason"]


def test_an_operators_move_wins_over_a_verdict_in_flight(reg: Registry) -> None:
    """Finding: hotfix v0003, then the canary's `promote v0003 -> v0002` reverted it."""
    from helpers import write_adapter

    clock = Clock(0)
    router = router_for(reg, 50, clock=clock, min_requests=1, duration_s=1)
    answer(router, candidate(router))  # green: the promotion is pending on this replica
    clock.now += 5
    router.judge("bot")
    hotfix = reg.publish("bot", write_adapter(reg.root.parent / "hotfix", seed=42)).version
    run_pass(router)  # the replica records its verdict: the registry refuses it
    assert reg.current("bot") == hotfix
    assert [e["action"] for e in reg.history("bot")].count("canary_promote") == 0


def test_refresh_follows_the_registry(reg: Registry) -> None:
    router = CanaryRouter(reg)
    router.refresh()
    assert not router.active
    c = start_canary(reg, "bot", "v0002", weight=10)
    router.refresh()
    assert router.canary("bot") == c
    other = CanaryRouter(reg)  # another replica aborts
    other.refresh()
    other.candidate_failed(Route("bot", "v0002", True, c.id), "load failed", 400)
    run_pass(other)
    router.refresh()
    assert not router.active and "candidate cannot be served" in reg.history("bot")[-1]["reason"]


def test_a_read_that_raced_a_local_abort_never_brings_the_canary_back(reg: Registry) -> None:
    router = router_for(reg, 100)
    c = router.canary("bot")
    assert c is not None
    stale = router.read_registry()  # in a thread, before the abort below
    router.candidate_failed(Route("bot", "v0002", True, c.id), "boom", 400)
    assert stale is not None
    router.apply(*stale)  # back on the loop, after the abort
    assert router.canary("bot") is None


def test_unwritable_registry_keeps_the_abort_pending_and_reported(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server_plugin.canary_router as module

    router = router_for(reg, 100, min_requests=1, max_error_rate=0)
    real = module.finish_canary

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(module, "finish_canary", read_only)
    answer(router, candidate(router), status=500)
    run_pass(router)
    assert router.canary("bot") is None  # still 100% on current here
    assert "cannot record canary abort" in router.status()["errors"]["bot"]
    assert router.status()["ended"][-1]["recorded"] is False
    assert read_canary(reg, "bot") is not None
    monkeypatch.setattr(module, "finish_canary", real)
    run_pass(router)  # the registry is writable again: the abort lands
    assert read_canary(reg, "bot") is None and "bot" not in router.status()["errors"]
    assert reg.history("bot")[-1]["action"] == "canary_abort"


def test_the_list_of_ended_canaries_is_bounded(reg: Registry) -> None:
    from server_plugin.canary_router import MAX_ENDED

    router = router_for(reg, 50)
    c = router.canary("bot")
    assert c is not None
    for i in range(MAX_ENDED * 3):
        router._end(c.__class__(**{**c.__dict__, "id": f"id-{i}"}), "abort", "x", {})
    assert len(router._ended) == MAX_ENDED


# -- the middleware ----------------------------------------------------------------------------
class FakeReconciler:
    lazy = False  # every name preloaded: the middleware loads pins only

    def __init__(self, fail: str | None = None, status: int = 400) -> None:
        self.fail, self.status = fail, status
        self.pinned: list[str] = []

    async def ensure(self, model: str, held: list[str]) -> PinRefusal | None:
        self.pinned.append(model)
        return PinRefusal(self.fail, self.status) if self.fail else None

    def release(self, held: list[str]) -> None:
        held.clear()


class FakePlugin:
    def __init__(self, reconciler: FakeReconciler, canary: CanaryRouter) -> None:
        self.reconciler = reconciler
        self.canary = canary
        self.max_parse_bytes = 1 << 20


def call_middleware(
    plugin: FakePlugin, payload: bytes, chunk: int = 1 << 16
) -> tuple[dict[bytes, bytes], bytes, int]:
    """Run one request through the middleware to a fake vLLM that answers as the model the
    body's top level names (json.loads, as vLLM does). Returns (headers, body, status)."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        parts = []
        while True:
            msg = await receive()
            parts.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        seen["body"] = b"".join(parts)
        seen["headers"] = dict(scope["headers"])
        model = json.loads(seen["body"])["model"]
        model = model if "@" in model else f"{model}@v0001"  # the name serves current
        reply = json.dumps({"id": "cmpl-1", "model": model, "usage": {"completion_tokens": 3}})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": reply.encode(), "more_body": False})

    parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)] or [b""]

    async def receive() -> Any:
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-length", str(len(payload)).encode())],
    }
    asyncio.run(ModelRequestMiddleware(app, plugin)(scope, receive, send))  # type: ignore[arg-type]
    return seen.get("headers", {}), seen.get("body", b""), statuses[0]


def counted(router: CanaryRouter) -> dict[str, int]:
    versions = router.status()["names"]["bot"]["versions"]
    return {v: s["requests"] for v, s in versions.items()}


def test_middleware_sends_the_candidate_through_the_pin_path(reg: Registry) -> None:
    router = router_for(reg, 100)
    fake = FakeReconciler()
    headers, forwarded, status = call_middleware(
        FakePlugin(fake, router), json.dumps(body()).encode()
    )
    assert json.loads(forwarded)["model"] == "bot@v0002" and fake.pinned == ["bot@v0002"]
    assert headers[b"content-length"] == str(len(forwarded)).encode()
    assert status == 200 and counted(router) == {"v0002": 1}


def test_middleware_falls_back_to_current_when_the_candidate_cannot_load(reg: Registry) -> None:
    router = router_for(reg, 100)
    original = json.dumps(body()).encode()
    _, forwarded, status = call_middleware(
        FakePlugin(FakeReconciler("rank too high"), router), original
    )
    assert forwarded == original and status == 200  # the user is served by current
    assert router.canary("bot") is None
    run_pass(router)
    assert "candidate cannot be served: rank too high" in reg.history("bot")[-1]["reason"]


def test_one_transient_refusal_does_not_end_a_canary(reg: Registry) -> None:
    """Finding: one 503 (cache full, engine busy) while loading the candidate ended it."""
    router = router_for(reg, 100, min_requests=20, max_error_rate=0.2)
    plugin = FakePlugin(FakeReconciler("cache full (temporary; retry later)", 503), router)
    _, forwarded, status = call_middleware(plugin, json.dumps(body()).encode())
    assert status == 200 and json.loads(forwarded)["model"] == "bot"  # current answered
    assert router.canary("bot") is not None  # still running: one candidate error counted
    assert router.status()["names"]["bot"]["versions"]["v0002"]["errors"] == 1


def test_a_crafted_body_is_served_by_the_side_it_is_counted_for(reg: Registry) -> None:
    """Finding: an escaped "mod\\u0065l" key plus a nested decoy {"model": "bot"} was counted
    as a candidate request while current answered it (the rewrite hit the decoy)."""
    router = router_for(reg, 100)
    crafted = b'{"mod\\u0065l": "bot", "messages": [], "metadata": {"model": "bot"}}'
    _, forwarded, _ = call_middleware(FakePlugin(FakeReconciler(), router), crafted)
    data = json.loads(forwarded)
    assert data["model"] == "bot@v0002" and data["metadata"] == {"model": "bot"}
    assert counted(router) == {"v0002": 1}


_key = st.sampled_from(["model", "mod\\u0065l", "\\u006dodel", "user", "x"])
_value = st.sampled_from(['"bot"', '"b\\u006ft"', '"other"', "3", '{"model": "bot"}', "[]"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_key, _value), min_size=1, max_size=6))
def test_any_body_is_counted_for_who_answers_it(
    tmp_path_factory: pytest.TempPathFactory, members: list[tuple[str, str]]
) -> None:
    """Hypothesis: escaped keys and names, duplicates, decoys. Whatever the body, the
    version counted is the version that answered (the fake app answers as vLLM parses)."""
    reg = registry_with_versions(tmp_path_factory.mktemp("r"), "bot", 2)
    router = router_for(reg, 50)
    payload = ("{" + ", ".join(f'"{k}": {v}' for k, v in members) + "}").encode()
    model = json.loads(payload).get("model")
    if model != "bot":
        return  # not a request for the canaried name: the app would 404 it
    _, forwarded, _ = call_middleware(FakePlugin(FakeReconciler(), router), payload)
    answered = json.loads(forwarded)["model"]
    want = "v0002" if answered == "bot@v0002" else "v0001"
    assert counted(router) == {want: 1}


def test_bodies_over_the_parse_cap_still_reach_the_candidate(reg: Registry) -> None:
    """Finding: bodies over 1 MiB were never parsed, so long prompts never reached the
    candidate and the canary proved nothing about them."""
    router = router_for(reg, 100)
    big = json.dumps(body(messages=[{"role": "user", "content": "a" * (3 << 20)}])).encode()
    _, forwarded, _ = call_middleware(FakePlugin(FakeReconciler(), router), big)
    assert json.loads(forwarded)["model"] == "bot@v0002" and counted(router) == {"v0002": 1}


def test_deeply_nested_json_is_a_400_not_a_500(reg: Registry) -> None:
    """Finding: nested JSON raised RecursionError in the middleware: a 500."""
    router = router_for(reg, 100)
    deep = b'{"model": "bot@v0001", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _, forwarded, status = call_middleware(FakePlugin(FakeReconciler(), router), deep)
    assert status == 400 and forwarded == b""
