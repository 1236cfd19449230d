"""The pin middleware with a fake ASGI app (no vLLM): bodies are read once, capped, and
parsed off the event loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from server_plugin.failures import Refusal
from server_plugin.middleware import ModelRequestMiddleware

CHUNK = 64 * 1024


class FakeReconciler:
    lazy = False  # every name preloaded: only pinned models are parsed

    def __init__(self, refusal: Refusal | None = None) -> None:
        self.pins: list[str] = []
        self.refusal = refusal
        self.held: list[str] = []  # what requests in flight hold

    async def ensure(self, model: str, held: list[str]) -> Refusal | None:
        self.pins.append(model)
        if self.refusal is None:
            held.append(model)
            self.held.append(model)
        return self.refusal

    def release(self, held: list[str]) -> None:
        for model in held:
            self.held.remove(model)
        held.clear()


class FakePlugin:
    def __init__(self, reconciler: FakeReconciler, cap: int = 1 << 20) -> None:
        self.reconciler = reconciler
        self.max_parse_bytes = cap
        self.canary = None  # no canary: the middleware only pins


class EchoApp:
    """Reads the whole body (like vLLM) and records it and when it started reading."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.delivered_at_start: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.delivered_at_start.append(scope["delivered"][0])
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.bodies.append(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def request(
    app: Any, body: bytes, *, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes, list[int]]:
    """Send ``body`` in 64 KiB chunks; return the status, the response body, and how many
    chunks were handed out."""
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
    delivered = [0]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": headers or [],
        "delivered": delivered,
    }

    async def receive() -> dict[str, Any]:
        i = delivered[0]
        delivered[0] += 1
        await asyncio.sleep(0)
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, payload, delivered


def big_body(size: int) -> bytes:
    head = b'{"model": "x@v0001", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_32mb_body_passes_through_unread_and_unparsed() -> None:
    """Finding: the middleware built every body with `bytes +=` (quadratic) and parsed it on
    the event loop: a 32 MB body stalled the server for 76 s."""
    rec, app = FakeReconciler(), EchoApp()
    middleware = ModelRequestMiddleware(app, FakePlugin(rec))  # type: ignore[arg-type]
    body = big_body(32 << 20)
    status, _, _ = request(middleware, body)
    assert status == 200
    assert app.bodies == [body]  # untouched
    assert rec.pins == []  # over the cap: not parsed, the pin is not loaded
    # Only the chunks up to the cap were read before the app took over the stream.
    assert app.delivered_at_start[0] <= (1 << 20) // CHUNK + 1


def test_content_length_over_the_cap_is_not_read_at_all() -> None:
    rec, app = FakeReconciler(), EchoApp()
    middleware = ModelRequestMiddleware(app, FakePlugin(rec, cap=1000))  # type: ignore[arg-type]
    body = big_body(5000)
    status, _, _ = request(middleware, body, headers=[(b"content-length", b"5000")])
    assert status == 200 and app.bodies == [body] and rec.pins == []
    assert app.delivered_at_start == [0]


def test_small_pinned_body_is_read_once_and_replayed() -> None:
    rec, app = FakeReconciler(), EchoApp()
    middleware = ModelRequestMiddleware(app, FakePlugin(rec))  # type: ignore[arg-type]
    body = big_body(300_000)  # several chunks, parsed in a thread
    status, _, _ = request(middleware, body)
    assert status == 200 and app.bodies == [body] and rec.pins == ["x@v0001"]
    assert rec.held == []  # released when the request ended
    plain = json.dumps({"model": "x", "messages": []}).encode()
    request(middleware, plain)
    assert rec.pins == ["x@v0001"] and app.bodies[-1] == plain


def test_refused_pins_answer_with_the_refusals_status() -> None:
    for refusal, err_type in [
        (Refusal("x@v0001 cannot be served: rank"), "BadRequestError"),
        (Refusal("cache full (temporary; retry later)", 503), "ServiceUnavailableError"),
    ]:
        app = EchoApp()
        middleware = ModelRequestMiddleware(app, FakePlugin(FakeReconciler(refusal)))  # type: ignore[arg-type]
        status, payload, _ = request(middleware, big_body(1000))
        error = json.loads(payload)["error"]
        assert status == refusal.status and error["type"] == err_type
        assert error["message"] == refusal.message and app.bodies == []
