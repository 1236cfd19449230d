"""What an answer says about itself: its top-level id and model, never a nested decoy."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from server_plugin.answers import HEADER, AnswerHeaders, answer_fields

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "id", "response", "x"]), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    top=st.dictionaries(st.sampled_from(["model", "id", "metadata", "response", "a"]), _json),
    ascii_only=st.booleans(),
    sse=st.booleans(),
)
def test_only_top_level_members_count(top: dict[str, Any], ascii_only: bool, sse: bool) -> None:
    text = json.dumps(top, ensure_ascii=ascii_only)
    data = (f"data: {text}\n\n" if sse else text).encode()
    found = answer_fields(data)
    for key in ("id", "model"):
        value = top.get(key)
        want = value if isinstance(value, str) else None
        if want is None and isinstance(top.get("response"), dict):
            nested = top["response"].get(key)
            want = nested if isinstance(nested, str) else None
        assert found.get(key) == want, (key, data)


def test_responses_stream_events_name_the_model_inside_response() -> None:
    event = {
        "response": {"id": "resp_1", "metadata": {"model": "evil@v9"}, "model": "bot@v0002"},
        "sequence_number": 0,
        "type": "response.created",
    }
    data = f"event: response.created\ndata: {json.dumps(event)}\n\n".encode()
    assert answer_fields(data) == {"id": "resp_1", "model": "bot@v0002"}


def test_the_header_cannot_be_spoofed_through_metadata() -> None:
    """Finding: on /v1/responses the answer echoes the client's `metadata` before its own
    `model`, and the header took the first "model" it saw."""
    answer = {
        "id": "resp_1",
        "created_at": 1,
        "metadata": {"model": "bot@v0009"},
        "model": "bot@v0001",
        "output": [],
    }

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    async def none(model: str) -> str | None:
        return None

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"{}"}

    scope = {"type": "http", "method": "POST", "path": "/v1/responses", "headers": []}
    middleware = AnswerHeaders(app, frozenset({"/v1/responses"}), none)
    asyncio.run(middleware(scope, receive, send))
    headers = dict(sent[0]["headers"])
    assert headers[HEADER.encode()] == b"bot@v0001"
