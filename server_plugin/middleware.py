"""The request middleware of the model routes: read the body once, route canaries, load on use.

A POST to a model route (``MODEL_ROUTES``) with a body of at most ``max_parse_bytes`` is
read once (its chunks joined once), its ``model`` looked up, and then:

- a canaried name is routed (``server_plugin.canary_router``): a candidate request is
  rewritten to ``NAME@vNNNN`` and served through the pin path; if the candidate cannot be
  loaded the request goes to the current version and the canary ends;
- a pinned ``name@vNNNN`` (or, with lazy loading, any name) is loaded before vLLM checks the
  model name, so the first request for it is answered, not refused.

Larger bodies pass through untouched and vLLM answers them. No vLLM import here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_plugin.canary_router import CanaryRouter
from server_plugin.http_errors import error_response
from server_plugin.reconciler import PinRefusal, Reconciler

logger = logging.getLogger(__name__)

MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
"""Routes whose JSON body names a model."""
# Bodies at least this large are parsed in a worker thread, off the event loop.
_PARSE_IN_THREAD_BYTES = 64 * 1024


class PluginState(Protocol):
    """What the middleware reads from the plugin (set once its start-up is done)."""

    @property
    def reconciler(self) -> Reconciler | None: ...

    @property
    def canary(self) -> CanaryRouter | None: ...

    @property
    def max_parse_bytes(self) -> int: ...


async def read_capped(receive: Receive, cap: int) -> tuple[list[Message], bytes | None]:
    """Receive a request body of at most ``cap`` bytes, chunks joined once.

    Returns the messages received (to replay them) and the body, or None as the body when
    it is larger than ``cap``: then the messages hold only its start and the caller passes
    the request through without reading the rest.
    """
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return messages, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def model_field(body: bytes) -> str | None:
    """The body's top-level ``model`` string, or None."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None  # vLLM reports the bad body itself
    return model if isinstance(model, str) else None


async def requested_model(body: bytes, *, any_name: bool = False) -> str | None:
    """The body's ``model`` when it names a pinned ``name@vNNNN``-like value (or, with
    ``any_name``, any value: lazy names load on their first request), else None.
    Large bodies are parsed in a thread so the event loop keeps serving."""
    if not any_name and b"@" not in body:
        return None
    if len(body) >= _PARSE_IN_THREAD_BYTES:
        model = await asyncio.to_thread(model_field, body)
    else:
        model = model_field(body)
    return model if model is not None and (any_name or "@" in model) else None


def content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ModelRequestMiddleware:
    """Route canaries and load ``name@vNNNN`` (and lazy names) on first use, before vLLM
    checks the model name.

    Only POSTs to the model routes with a body of at most ``max_parse_bytes`` are read
    (their chunks joined once, large ones parsed off the event loop); larger bodies pass
    through untouched and vLLM answers them.
    """

    def __init__(self, app: ASGIApp, plugin: PluginState) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reconciler = self.plugin.reconciler
        cap = self.plugin.max_parse_bytes
        if (
            reconciler is None
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"].removeprefix(scope.get("root_path", "")) not in MODEL_ROUTES
            or (content_length(scope) or 0) > cap
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        messages, body = await read_capped(receive, cap)
        canary, route, finish = self.plugin.canary, None, None
        if canary is not None and canary.active and body is not None:
            routed, route = canary.route_body(body, scope["headers"])
            if route is not None and route.candidate:
                refusal = await self._ensure_served(reconciler, f"{route.name}@{route.version}")
                if refusal is None:
                    body, messages, scope = (
                        routed,
                        _rewritten(messages, routed),
                        _sized(scope, routed),
                    )
                else:  # never fail a user for a canary: current answers, the canary ends
                    canary.candidate_failed(route, refusal.message)
                    route = None
            if route is not None:
                send, finish = canary.wrap_send(route, send, started)
        candidate = route is not None and route.candidate
        model = (
            await requested_model(body, any_name=reconciler.lazy)
            if body is not None and not candidate
            else None
        )
        if model is not None:
            refusal = await self._ensure_served(reconciler, model)
            if refusal is not None:
                await error_response(refusal.status, refusal.message)(scope, receive, send)
                return
        pending = deque(messages)

        async def replay() -> Message:
            if pending:
                return pending.popleft()
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if finish is not None:
                finish()

    @staticmethod
    async def _ensure_served(reconciler: Reconciler, model: str) -> PinRefusal | None:
        """Load a lazy name or a pinned ``name@vNNNN`` (None: it is served, or loading it
        failed in a way the request should find out from vLLM)."""
        try:
            if "@" not in model:
                return await reconciler.ensure_name(model)
            return await reconciler.ensure_pinned(model)
        except Exception:
            logger.exception("agent_finetune: loading pinned %s failed", model)
            return None


def _rewritten(messages: list[Message], body: bytes) -> list[Message]:
    """The request messages with the body replaced (a disconnect after it is kept)."""
    rest = [m for m in messages if m["type"] != "http.request"]
    return [{"type": "http.request", "body": body, "more_body": False}, *rest]


def _sized(scope: Scope, body: bytes) -> Scope:
    """``scope`` with a content-length that matches the rewritten body."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
