"""The plugin's canary router without vLLM: split, stickiness, rewrite, guards, feedback."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import registry_with_versions
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import Guards, read_canary, start_canary
from server_plugin.canary_router import CanaryRouter, Route, parse_feedback, sticky_draw
from server_plugin.middleware import ModelRequestMiddleware
from server_plugin.reconciler import PinRefusal


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 2)


def router_for(
    reg: Registry, weight: float = 20, clock: Clock | None = None, **guards: Any
) -> CanaryRouter:
    start_canary(reg, "bot", "v0002", weight=weight, guards=Guards(**guards), auto_promote=True)
    router = CanaryRouter(reg, rng=random.Random(7), clock=clock or Clock(0))
    router.refresh()
    return router


def body(**fields: Any) -> bytes:
    return json.dumps(
        {"model": "bot", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


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


def test_rewrite_only_the_candidate_and_keep_every_other_field(reg: Registry) -> None:
    router = router_for(reg, 100)
    original = body(user="alice", max_tokens=7, temperature=0)
    out, route = router.route_body(original, [])
    assert route == Route("bot", "v0002", True, router.canary("bot").id)  # type: ignore[union-attr]
    data = json.loads(out)
    assert data["model"] == "bot@v0002" and data["max_tokens"] == 7 and data["user"] == "alice"
    other = json.dumps({"model": "someone-else"}).encode()
    assert router.route_body(other, []) == (other, None)
    assert router.route_body(b"{broken", []) == (b"{broken", None)


def test_session_header_makes_it_sticky(reg: Registry) -> None:
    router = router_for(reg, 50)
    headers = [(b"x-session-id", b"conversation-42")]
    routes = {router.route_body(body(), headers)[1] for _ in range(50)}
    assert len(routes) == 1


def test_current_side_passes_the_body_untouched(reg: Registry) -> None:
    router = router_for(reg, 0.001)
    original = body()
    out, route = router.route_body(original, [(b"x-session-id", b"s")])
    assert route is not None and not route.candidate and route.version == "v0001"
    assert out is original


def run_pass(router: CanaryRouter) -> None:
    asyncio.run(router.pass_once())


def test_error_guard_aborts_locally_at_once_then_in_the_registry(reg: Registry) -> None:
    router = router_for(reg, 50, min_requests=5, max_error_rate=0.2)
    c = router.canary("bot")
    assert c is not None
    cand = Route("bot", "v0002", True, c.id)
    for status in (200, 200, 500, 200):
        router.record(cand, status, 0.1, None)
    assert router.canary("bot") is not None  # 4 < min_requests: not judged yet
    router.record(cand, 500, 0.1, None)  # 2 of 5 = 0.4 > 0.2
    assert router.canary("bot") is None
    assert all(not router.choose("bot", None) for _ in range(100))  # 100% current, now
    run_pass(router)
    assert read_canary(reg, "bot") is None
    last = reg.history("bot")[-1]
    assert last["action"] == "canary_abort" and "error rate 0.400 > 0.2" in last["reason"]
    assert last["evidence"]["versions"]["v0002"]["errors"] == 2
    assert reg.current("bot") == "v0001"


def test_latency_guard_compares_medians(reg: Registry) -> None:
    router = router_for(reg, 50, min_requests=3, max_latency_ratio=2.0)
    cid = router.canary("bot").id  # type: ignore[union-attr]
    for _ in range(3):
        router.record(Route("bot", "v0001", False, cid), 200, 0.10, None)
        router.record(Route("bot", "v0002", True, cid), 200, 0.19, None)
    assert router.canary("bot") is not None
    for _ in range(2):
        router.record(Route("bot", "v0002", True, cid), 200, 0.5, None)
    assert router.canary("bot") is not None  # median 0.19 s: 1.9x < 2x
    router.record(Route("bot", "v0002", True, cid), 200, 0.5, None)  # median 0.345 s: 3.45x
    assert router.canary("bot") is None
    run_pass(router)
    assert "median latency" in reg.history("bot")[-1]["reason"]


def test_feedback_guard_and_feedback_lookup(reg: Registry) -> None:
    router = router_for(reg, 50, min_feedback=3, max_negative_feedback=0.5)
    cid = router.canary("bot").id  # type: ignore[union-attr]
    router.record(Route("bot", "v0002", True, cid), 200, 0.1, "chatcmpl-1")
    router.record(Route("bot", "v0001", False, cid), 200, 0.1, "chatcmpl-2")
    assert router.feedback("bot", "chatcmpl-2", -1, None)["version"] == "v0001"
    assert router.feedback("bot", "chatcmpl-1", 1, None)["version"] == "v0002"
    with pytest.raises(KeyError):
        router.feedback("bot", "chatcmpl-unknown", -1, None)
    # Answered by another replica: the answer's model names the version.
    router.feedback("bot", "elsewhere-1", -1, "bot@v0002")
    assert router.canary("bot") is not None  # 2 scores < min_feedback 3
    router.feedback("bot", "elsewhere-2", -0.5, "bot@v0002")  # 2 of 3 negative > 0.5
    assert router.canary("bot") is None
    run_pass(router)
    assert "negative feedback 0.67" in reg.history("bot")[-1]["reason"]


def test_auto_promote_after_green_duration_with_enough_requests(reg: Registry) -> None:
    clock = Clock(0)
    router = router_for(reg, 50, clock=clock, min_requests=2, duration_s=60)
    c = router.canary("bot")
    assert c is not None
    clock.now = c.started_ts + 61
    run_pass(router)
    assert router.canary("bot") is not None  # no evidence yet: this replica does not promote
    for _ in range(2):
        router.record(Route("bot", "v0002", True, c.id), 200, 0.1, None)
    run_pass(router)
    assert reg.current("bot") == "v0002" and read_canary(reg, "bot") is None
    assert reg.history("bot")[-1]["action"] == "canary_promote"


def test_refresh_follows_the_registry(reg: Registry, tmp_path: Path) -> None:
    router = CanaryRouter(reg)
    router.refresh()
    assert not router.active
    c = start_canary(reg, "bot", "v0002", weight=10)
    router.refresh()
    assert router.canary("bot") == c
    other = CanaryRouter(reg)  # another replica aborts
    other.refresh()
    other.candidate_failed(Route("bot", "v0002", True, c.id), "load failed")
    run_pass(other)
    router.refresh()
    assert not router.active and "candidate cannot be served" in reg.history("bot")[-1]["reason"]


def test_wrap_send_records_status_latency_and_id(reg: Registry) -> None:
    router = router_for(reg, 50)
    cid = router.canary("bot").id  # type: ignore[union-attr]
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def scenario() -> None:
        wrapped, finish = router.wrap_send(Route("bot", "v0002", True, cid), send, 0.0)
        await wrapped({"type": "http.response.start", "status": 200, "headers": []})
        await wrapped(
            {
                "type": "http.response.body",
                "body": b'data: {"id":"chatcmpl-9","x":1}',
                "more_body": True,
            }
        )
        await wrapped({"type": "http.response.body", "body": b"", "more_body": False})
        finish()  # idempotent
        _, finish2 = router.wrap_send(Route("bot", "v0001", False, cid), send, 0.0)
        finish2()  # the app raised before answering: a 5xx

    asyncio.run(scenario())
    status = router.status()["names"]["bot"]["versions"]
    assert status["v0002"]["requests"] == 1 and status["v0002"]["errors"] == 0
    assert status["v0001"]["errors"] == 1
    assert router.feedback("bot", "chatcmpl-9", 1, None)["version"] == "v0002"
    assert len(sent) == 3


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "JSON object"),
        ({"score": 1}, '"id"'),
        ({"id": "x", "score": 2}, "-1"),
        ({"id": "x", "score": True}, "-1"),
        ({"id": "x", "score": "1"}, "-1"),
        ({"id": "x", "score": 0, "model": 3}, "model"),
    ],
)
def test_parse_feedback_refuses_bad_bodies(data: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_feedback(data)


def test_parse_feedback_accepts_the_documented_shape() -> None:
    assert parse_feedback({"id": "chatcmpl-1", "score": -1}) == ("chatcmpl-1", -1.0, None)
    assert parse_feedback({"id": "a", "score": 0.5, "model": "bot@v0002"}) == (
        "a",
        0.5,
        "bot@v0002",
    )


class FakeReconciler:
    lazy = False  # every name preloaded: the middleware loads pins only

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.pinned: list[str] = []

    async def ensure_pinned(self, model: str) -> PinRefusal | None:
        self.pinned.append(model)
        return PinRefusal(self.fail) if self.fail else None


class FakePlugin:
    def __init__(self, reconciler: FakeReconciler, canary: CanaryRouter) -> None:
        self.reconciler = reconciler
        self.canary = canary
        self.max_parse_bytes = 1 << 20


def call_middleware(plugin: FakePlugin, payload: bytes) -> tuple[dict[str, Any], bytes, int]:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        msg = await receive()
        seen["body"] = msg["body"]
        seen["headers"] = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"id":"cmpl-1"}', "more_body": False})

    async def receive() -> Any:
        return {"type": "http.request", "body": payload, "more_body": False}

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
    return seen["headers"], seen["body"], statuses[0]


def test_middleware_sends_the_candidate_through_the_pin_path(reg: Registry) -> None:
    router = router_for(reg, 100)
    fake = FakeReconciler()
    headers, forwarded, status = call_middleware(FakePlugin(fake, router), body())
    assert json.loads(forwarded)["model"] == "bot@v0002" and fake.pinned == ["bot@v0002"]
    assert headers[b"content-length"] == str(len(forwarded)).encode()
    assert status == 200
    assert router.status()["names"]["bot"]["versions"]["v0002"]["requests"] == 1


def test_middleware_falls_back_to_current_when_the_candidate_cannot_load(reg: Registry) -> None:
    router = router_for(reg, 100)
    original = body()
    _, forwarded, status = call_middleware(
        FakePlugin(FakeReconciler("rank too high"), router), original
    )
    assert forwarded == original and status == 200  # the user is served by current
    assert router.canary("bot") is None
    run_pass(router)
    assert "candidate cannot be served: rank too high" in reg.history("bot")[-1]["reason"]


def test_a_read_that_raced_a_local_abort_never_brings_the_canary_back(reg: Registry) -> None:
    router = router_for(reg, 100)
    c = router.canary("bot")
    assert c is not None
    stale = router.read_registry()  # in a thread, before the abort below
    router.candidate_failed(Route("bot", "v0002", True, c.id), "boom")
    assert stale is not None
    router.apply(*stale)  # back on the loop, after the abort
    assert router.canary("bot") is None


def test_unwritable_registry_keeps_the_abort_pending_and_reported(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server_plugin.canary_router as module

    router = router_for(reg, 100, min_feedback=1, max_negative_feedback=0)
    router.record(Route("bot", "v0002", True, router.canary("bot").id), 200, 0.1, "r1")  # type: ignore[union-attr]
    real = module.finish_canary

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(module, "finish_canary", read_only)
    router.feedback("bot", "r1", -1, None)
    run_pass(router)
    assert router.canary("bot") is None  # still 100% on current here
    assert "cannot record canary abort" in router.status()["errors"]["bot"]
    assert router.status()["ended"][-1]["recorded"] is False
    assert read_canary(reg, "bot") is not None
    monkeypatch.setattr(module, "finish_canary", real)
    run_pass(router)  # the registry is writable again: the abort lands
    assert read_canary(reg, "bot") is None and "bot" not in router.status()["errors"]
    assert reg.history("bot")[-1]["action"] == "canary_abort"
