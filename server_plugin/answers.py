"""What every model answer carries: the model that answered, in a header; and, for a model
the server does not know, a 404 that says which adapters and versions exist.

Some clients hide the body's ``model`` field (LiteLLM streaming replaces each chunk's
``model`` with the requested name), so the version that answered is also sent as the
response header ``x-adapter-version`` (``support-bot@v0002``), for streamed answers too.

The header is read from the answer itself: the first body message's top-level ``"model"``
(``answer_fields``; for the Responses API's stream events, the ``response`` object's), the
name vLLM resolved when it admitted the request; a ``model`` nested deeper (in the
``metadata`` a client sends, which the Responses API echoes before its own ``model``) never
counts. ``http.response.start`` is held back until that first body message; nothing else is
buffered. The same answer is counted per version (``server_plugin.version_metrics``). No
vLLM import here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_finetune.registry.names import PIN_SEPARATOR, is_name, split_model
from server_plugin.catalog import Catalog
from server_plugin.version_metrics import VersionMetrics

HEADER = "x-adapter-version"
# JSON tokens that matter to find top-level members: strings (escapes included) and
# punctuation; numbers, true, false and null are skipped over.
_TOKEN_RE = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')
_FIELDS = ("id", "model")
# vLLM's text for an unknown model (vllm/entrypoints/openai/models/serving.py, 0.32).
_MISSING_RE = re.compile(r"The model `([^`]+)` does not exist")

Describe = Callable[[str], Awaitable[str | None]]


def answer_fields(data: bytes) -> dict[str, str]:
    """The top-level ``id`` and ``model`` strings of the first JSON object in ``data`` (an
    answer's first body message, plain JSON or an SSE event), or of its ``response`` member
    (Responses API stream events). Members nested anywhere else are ignored; a field that
    is not within ``data`` is missing."""
    start = data.find(b"{")
    if start < 0:
        return {}
    found: dict[str, str] = {}
    inner: dict[str, str] = {}
    depth, key, expect_key, in_response = 0, None, False, False
    for m in _TOKEN_RE.finditer(data, start):
        tok = m.group()
        if tok in (b"{", b"["):
            if depth == 1 and tok == b"{" and key == "response":
                in_response = True
            depth += 1
            expect_key = tok == b"{"
        elif tok in (b"}", b"]"):
            depth -= 1
            in_response = in_response and depth >= 2
            if depth == 0:
                break
        elif tok == b":":
            expect_key = False
        elif tok == b",":
            expect_key = True
        elif expect_key:
            key = _decode(tok)
        elif depth == 1 or (depth == 2 and in_response):
            target = found if depth == 1 else inner
            if key in _FIELDS and key not in target:
                value = _decode(tok)
                if value is not None:
                    target[key] = value
            if len(found) == len(_FIELDS):
                break
    return {**inner, **found}


def _decode(token: bytes) -> str | None:
    """A JSON string token's text (json.loads only for the rare token with an escape)."""
    if b"\\" not in token:
        try:
            return token[1:-1].decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def missing_model_message(catalog: Catalog, model: str) -> str | None:
    """A 404 text naming what exists instead of ``model``, or None to keep vLLM's. From
    the catalog: an unknown model (client input) never costs a registry scan."""
    parsed = split_model(model)
    name = parsed[0] if parsed else model.partition(PIN_SEPARATOR)[0]
    versions = catalog.versions(name) if is_name(name) else []
    if versions:
        current = catalog.current(name)
        return (
            f"The model `{model}` does not exist. Adapter {name!r} has versions "
            f"{', '.join(versions)} (current: {current or 'none'}); send model={name!r} for "
            f"the current version or model='{name}@vNNNN' to pin one."
        )
    names = catalog.names()
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return (
        f"The model `{model}` does not exist. Adapters in the registry: {shown or 'none'} "
        "(GET /v1/models lists every servable name and version)."
    )


def _answered_by(start: Message) -> str | None:
    """The ``x-adapter-version`` ``_annotate`` put on an answer's start."""
    for k, v in start.get("headers", ()):
        if k == _HEADER_BYTES:
            return bytes(v).decode("utf-8", "replace")
    return None


_HEADER_BYTES = HEADER.encode()


class AnswerHeaders:
    """ASGI middleware for the model routes: ``x-adapter-version`` on every answer, and a
    helpful 404 for unknown models (``describe`` returns its text, or None)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: frozenset[str],
        describe: Describe,
        versions: VersionMetrics | None = None,
    ) -> None:
        self.app = app
        self.routes = routes
        self.describe = describe
        self.versions = versions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"].removeprefix(scope.get("root_path", "")) not in self.routes
        ):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        versions, answer, status = self.versions, None, 0

        async def send_annotated(message: Message) -> None:
            nonlocal held, answer, status
            if message["type"] == "http.response.start":
                held = message
                return
            if held is not None and message["type"] == "http.response.body":
                start, held = held, None
                start, message = await self._annotate(start, message)
                status = start.get("status", 0)
                if versions is not None:
                    answer = versions.answer_started(_answered_by(start))
                await send(start)
            if answer is not None and message["type"] == "http.response.body":
                data = message.get("body", b"")
                if b"_tokens" in data or b'"error"' in data:  # most stream chunks: neither
                    versions.body(answer, data)  # type: ignore[union-attr]
                if not message.get("more_body", False):
                    done, answer = answer, None
                    versions.answer_ended(done, status)  # type: ignore[union-attr]
            await send(message)

        try:
            await self.app(scope, receive, send_annotated)
        finally:
            if answer is not None and versions is not None:  # cut off: counted as ended
                versions.answer_ended(answer, status)

    async def _annotate(self, start: Message, body: Message) -> tuple[Message, Message]:
        data: bytes = body.get("body", b"")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != HEADER.encode()]
        if start.get("status") == 404 and not body.get("more_body", False):
            return await self._explain_404(start, body, data)
        model = answer_fields(data).get("model") if start.get("status") == 200 else None
        if model:
            headers.append((HEADER.encode(), model.encode("utf-8", "replace")))
        return {**start, "headers": headers}, body

    async def _explain_404(
        self, start: Message, body: Message, data: bytes
    ) -> tuple[Message, Message]:
        try:
            payload = json.loads(data)
            missing = _MISSING_RE.search(payload["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return start, body
        if missing is None:
            return start, body
        try:
            text = await self.describe(missing.group(1))
        except Exception:  # a hint in an error message must never fail the request
            return start, body
        if not text:
            return start, body
        payload["error"]["message"] = text
        new = json.dumps(payload).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new)).encode()))
        return {**start, "headers": headers}, {**body, "body": new}
