"""The request middleware of the model routes: read the body once, route canaries, load on use.

A POST to a model route (``MODEL_ROUTES``) with a body of at most ``max_parse_bytes`` is
read once (its chunks joined once), parsed once when it may matter (off the event loop when
large) exactly as vLLM parses it (``json.loads``: an escaped key is the same key, the last
of duplicate keys wins, a ``model`` nested anywhere but the top level is not the model),
and then:

- a canaried name is routed (``server_plugin.canary_router``): a candidate request is
  re-serialised with ``model`` = ``NAME@vNNNN`` and served through the pin path; if the
  candidate cannot be loaded the request goes to the current version;
- a pinned ``name@vNNNN`` (or, with lazy loading, any name) is loaded before vLLM checks the
  model name, so the first request for it is answered, not refused.

Larger bodies pass through untouched and vLLM answers them, except while a canary runs:
then bodies up to ``CANARY_MAX_BODY_BYTES`` are read and routed too (long contexts reach
the candidate; a canary that never sees them proves nothing about them). A body nested too
deep to parse is answered 400 here, not 500 by vLLM. No vLLM import here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_plugin.bodies import read_capped
from server_plugin.canary_router import CanaryRouter, Route
from server_plugin.failures import Refusal
from server_plugin.http_errors import error_response
from server_plugin.reconciler import Reconciler

logger = logging.getLogger(__name__)

MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
"""Routes whose JSON body names a model."""
CANARY_MAX_BODY_BYTES = 64 << 20
"""While a canary runs, bodies up to this size are read and routed (above it: unrouted)."""
# Bodies at least this large are parsed (and re-serialised) in a worker thread.
_PARSE_IN_THREAD_BYTES = 64 * 1024
T = TypeVar("T")


class PluginState(Protocol):
    """What the middleware reads from the plugin (set once its start-up is done)."""

    @property
    def reconciler(self) -> Reconciler | None: ...

    @property
    def canary(self) -> CanaryRouter | None: ...

    @property
    def max_parse_bytes(self) -> int: ...


class BodyTooDeep(Exception):
    """The request body nests JSON deeper than ``json.loads`` can parse."""


def parse_body(body: bytes) -> dict[str, Any] | None:
    """The request body as vLLM will see it: a JSON object, or None (vLLM reports a bad
    body itself); BodyTooDeep for nesting too deep to parse."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise BodyTooDeep from None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def serialise(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


async def _off_loop_if_large(size: int, func: Callable[[], T]) -> T:
    """Run ``func`` in a worker thread when it works on at least ``_PARSE_IN_THREAD_BYTES``
    bytes, so the event loop keeps serving; inline otherwise (a thread hop costs more)."""
    if size >= _PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(func)
    return func()


def mentions(body: bytes, names: frozenset[str]) -> bool:
    """Whether the body may name one of ``names``: a substring test, far cheaper than a
    parse; an escape sequence may spell a name, so such bodies are parsed too."""
    return b"\\u" in body or any(f'"{n}"'.encode() in body for n in names)


def content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ModelRequestMiddleware:
    """Route canaries and load ``name@vNNNN`` (and lazy names) on first use, before vLLM
    checks the model name (see the module docstring)."""

    def __init__(self, app: ASGIApp, plugin: PluginState) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reconciler, canary = self.plugin.reconciler, self.plugin.canary
        routing = canary is not None and canary.active
        cap = self.plugin.max_parse_bytes
        limit = max(cap, CANARY_MAX_BODY_BYTES) if routing else cap
        if (
            reconciler is None
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"].removeprefix(scope.get("root_path", "")) not in MODEL_ROUTES
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if (content_length(scope) or 0) > limit:
            messages, body = list[Message](), None
        else:
            messages, body = await read_capped(receive, limit)
        finish: Callable[[], None] | None = None
        held: list[str] = []  # what this request asked for stays loaded until it ends
        if body is None:
            if canary is not None and routing:
                canary.unrouted_large += 1
        else:
            try:
                scope, messages, route = await self._prepare(
                    reconciler, scope, messages, body, held
                )
            except BodyTooDeep:
                reconciler.release(held)
                text = "the request body nests JSON deeper than this server parses"
                await error_response(400, text, param=None)(scope, receive, send)
                return
            except _Refused as r:
                reconciler.release(held)
                await error_response(r.status, r.message)(scope, receive, send)
                return
            if route is not None and canary is not None:
                send, finish = canary.wrap_send(route, send, started)
        pending = deque(messages)

        async def replay() -> Message:
            if pending:
                return pending.popleft()
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            reconciler.release(held)
            if finish is not None:
                finish()

    async def _prepare(
        self,
        reconciler: Reconciler,
        scope: Scope,
        messages: list[Message],
        body: bytes,
        held: list[str],
    ) -> tuple[Scope, list[Message], Route | None]:
        """Parse the body once if it may matter, route a canaried name, load what the
        request names (held in ``held`` until the request ends); (scope, messages, route)
        to forward, rewritten for a candidate."""
        canary = self.plugin.canary
        want_route = canary is not None and canary.active and mentions(body, canary.names)
        small = len(body) <= self.plugin.max_parse_bytes
        want_model = small and (reconciler.lazy or b"@" in body)
        if not (want_route or want_model):
            return scope, messages, None
        data = await _off_loop_if_large(len(body), lambda: parse_body(body))
        if data is None:
            return scope, messages, None
        route = canary.route(data, scope["headers"]) if canary is not None and want_route else None
        if canary is not None and route is not None and route.candidate:
            pinned = canary.pinned(data, route)
            refusal = await self._ensure_served(reconciler, pinned["model"], held)
            if refusal is None:
                routed = await _off_loop_if_large(len(body), lambda: serialise(pinned))
                return _sized(scope, routed), _rewritten(messages, routed), route
            canary.candidate_failed(route, refusal.message, refusal.status)
            route = None  # never fail a user for a canary: current answers
        model = data.get("model")
        if want_model and isinstance(model, str) and (reconciler.lazy or "@" in model):
            refusal = await self._ensure_served(reconciler, model, held)
            if refusal is not None:
                raise _Refused(refusal.status, refusal.message)
        return scope, messages, route

    @staticmethod
    async def _ensure_served(reconciler: Reconciler, model: str, held: list[str]) -> Refusal | None:
        """Load a lazy name or a pinned ``name@vNNNN`` and hold it in ``held`` (None: it is
        served, or loading it failed in a way the request should find out from vLLM)."""
        try:
            return await reconciler.ensure(model, held)
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
