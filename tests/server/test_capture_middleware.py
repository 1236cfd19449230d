"""Capture in the server: sampled chat completions (plain and streamed) reach the registry
redacted, off the request path; a full queue drops and counts; feedback with a correction
joins the captured exchange, also when it reaches another replica."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from helpers import registry_with_versions
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send
from test_canary_router import router_for
from test_feedback import _Plugin, post

from agent_finetune.registry import Registry
from agent_finetune.registry.capture import CaptureSettings, read_capture, write_settings
from server_plugin.capture import Capture, CaptureMiddleware, Exchange
from server_plugin.feedback import FeedbackRoute
from server_plugin.redaction import builtin, luhn_ok


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return registry_with_versions(tmp_path, "bot", 2)


def capture_on(reg: Registry, **kw: Any) -> None:
    write_settings(reg.name_dir("bot"), CaptureSettings(enabled=True, **kw))


def answer_app(text: str, rid: str = "chatcmpl-1", stream: bool = False) -> Any:
    """A fake vLLM: answers a chat completion as bot@v0001, plain or streamed."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if not stream:
            body = {
                "id": rid,
                "model": "bot@v0001",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            }
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
            event = {
                "id": rid,
                "model": "bot@v0001",
                "choices": [{"index": 0, "delta": {"content": piece}}],
            }
            data = f"data: {json.dumps(event)}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def chat(mw: CaptureMiddleware, question: str, model: str = "bot") -> list[Message]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}]})
    sent: list[Message] = []
    incoming = [{"type": "http.request", "body": body.encode(), "more_body": False}]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(mw(scope, receive, send))
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_sampled_answers_are_captured_redacted_and_their_ids_issued(
    reg: Registry, stream: bool
) -> None:
    capture_on(reg)
    issued: list[tuple[str, str, str]] = []
    cap = Capture(reg, "r1", on_issued=lambda *a: issued.append(a))
    cap.refresh()
    text = "Mail ann@example.com or call +1 555 123 4567."
    mw = CaptureMiddleware(answer_app(text, stream=stream), lambda: cap)
    sent = chat(mw, "my card is 4111 1111 1111 1111, email me at bob@corp.io")
    assert sent[0]["status"] == 200  # the client got its answer untouched
    chat(mw, "not captured", model="other")
    assert issued == [("bot", "chatcmpl-1", "v0001")]
    assert cap.drain() == 1
    (ex, fb) = read_capture(reg.name_dir("bot")).joined()[0]
    assert fb is None and ex["version"] == "v0001" and ex["replica"] == "r1"
    assert ex["messages"] == [{"role": "user", "content": "my card is [card], email me at [email]"}]
    assert ex["answer"] == "Mail [email] or call [phone]."


def test_capture_off_or_sample_zero_captures_nothing(reg: Registry) -> None:
    cap = Capture(reg, "r1")
    cap.refresh()
    assert not cap.names  # never started: the middleware passes everything through
    capture_on(reg, sample=0.0)
    cap.refresh()
    chat(CaptureMiddleware(answer_app("hi"), lambda: cap), "q")
    assert cap.drain() == 0 and not read_capture(reg.name_dir("bot")).exchanges


def test_a_full_queue_drops_and_counts_and_serving_goes_on(reg: Registry) -> None:
    capture_on(reg)
    cap = Capture(reg, "r1", max_queue=3)
    cap.refresh()
    mw = CaptureMiddleware(answer_app("fine"), lambda: cap)
    for i in range(5):
        assert chat(mw, f"q{i}")[0]["status"] == 200
    assert cap.dropped == {"queue_full": 2}
    assert cap.drain() == 3


def test_a_failing_redact_hook_writes_nothing(reg: Registry) -> None:
    mod = types.ModuleType("capture_hook_mod")
    mod.boom = lambda text: 1 / 0  # type: ignore[attr-defined]
    mod.upper = lambda text: text.upper()  # type: ignore[attr-defined]
    sys.modules["capture_hook_mod"] = mod
    capture_on(reg, redact="capture_hook_mod:boom")
    cap = Capture(reg, "r1")
    cap.refresh()
    chat(CaptureMiddleware(answer_app("secret"), lambda: cap), "q")
    assert cap.drain() == 0 and cap.dropped == {"redact_failed": 1}
    capture_on(reg, redact="capture_hook_mod:upper")
    cap.refresh()
    chat(CaptureMiddleware(answer_app("secret"), lambda: cap), "q")
    assert cap.drain() == 1
    assert read_capture(reg.name_dir("bot")).joined()[0][0]["answer"] == "SECRET"
    capture_on(reg, redact="late_hook_mod:scrub")
    cap.refresh()
    assert "late_hook_mod" in cap.errors["bot"]  # not importable (yet): nothing is written
    late = types.ModuleType("late_hook_mod")
    late.scrub = lambda text: "[scrubbed]"  # type: ignore[attr-defined]
    sys.modules["late_hook_mod"] = late  # installed later: no restart needed
    cap.refresh()
    assert "bot" not in cap.errors
    chat(CaptureMiddleware(answer_app("secret"), lambda: cap), "q")
    assert cap.drain() == 1


def test_unparsable_answers_are_counted_not_written(reg: Registry) -> None:
    capture_on(reg)
    cap = Capture(reg, "r1")
    cap.refresh()
    cap.offer(Exchange("bot", b"{not json", [b"{}"], 0.1, 1.0))
    assert cap.drain() == 0 and cap.dropped == {"unparsable": 1}


def test_feedback_with_a_correction_joins_a_captured_answer_on_another_replica(
    reg: Registry,
) -> None:
    capture_on(reg)
    a = router_for(reg, start=False, replica="ra")
    b = router_for(reg, start=False, replica="rb")
    cap_a = Capture(reg, "ra", on_issued=a.captured)
    cap_b = Capture(reg, "rb", on_issued=b.captured)
    cap_a.refresh()
    cap_b.refresh()

    async def flow() -> None:  # the routers' loops: flush a's answer log, b reads it
        a._loop = asyncio.get_running_loop()
        chat_in_loop = CaptureMiddleware(answer_app("Paris is in Spain"), lambda: cap_a)
        body = b'{"model": "bot", "messages": [{"role": "user", "content": "Where is Paris?"}]}'
        msgs = [{"type": "http.request", "body": body}]

        async def receive() -> Message:
            return msgs.pop(0)

        async def send(m: Message) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        await chat_in_loop(scope, receive, send)
        await asyncio.sleep(0.1)  # a's answer log is flushed

    asyncio.run(flow())
    a._loop = None
    cap_a.drain()
    b.refresh()
    route = FeedbackRoute(_Plugin(b))
    route.plugin.capture = cap_b  # type: ignore[attr-defined]
    status, out = post(
        route, "bot", {"id": "chatcmpl-1", "score": -1, "correction": "Paris is in France"}
    )
    assert status == 200 and out["version"] == "v0001" and out["captured"], out
    status, _ = post(route, "bot", {"id": "chatcmpl-1", "score": -1, "correction": 5})
    assert status == 400
    status, _ = post(route, "bot", {"id": "chatcmpl-1", "score": 1, "correction": "x" * 20_000})
    assert status == 400
    assert post(route, "bot", {"id": "never-captured", "score": 1})[0] == 404
    cap_b.drain()
    (ex, fb) = read_capture(reg.name_dir("bot")).joined()[0]
    assert ex["replica"] == "ra" and fb is not None and fb["replica"] == "rb"
    assert fb["correction"] == "Paris is in France" and fb["score"] == -1


# -- redaction ---------------------------------------------------------------------------------
def _luhn_complete(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


words = st.text(alphabet="abcdefghij klmnop", max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    before=words,
    after=words,
    user=st.from_regex(r"[a-z][a-z0-9._]{0,10}", fullmatch=True),
    domain=st.from_regex(r"[a-z]{1,10}\.(com|org|io|co\.uk)", fullmatch=True),
    card=st.from_regex(r"[3-6]\d{14}", fullmatch=True),
    sep=st.sampled_from(["", " ", "-"]),
    phone=st.from_regex(r"\+\d{1,3} \d{2,4} \d{3,4} \d{3,4}", fullmatch=True),
)
def test_pii_never_survives_redaction(
    before: str, after: str, user: str, domain: str, card: str, sep: str, phone: str
) -> None:
    number = _luhn_complete(card)
    spaced = sep.join(number[i : i + 4] for i in range(0, 16, 4))
    text = f"{before} {user}@{domain} {after} {spaced} {before} {phone} {after}"
    out = builtin(text)
    assert f"{user}@{domain}" not in out and "[email]" in out
    assert spaced not in out and "[card]" in out
    assert (phone not in out and "[phone]" in out) or out.count("[card]") == 2
    assert not any(ch.isdigit() for ch in out) and "@" not in out  # no PII digit survives
    assert out.startswith(before.rstrip()) or not before.strip()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",), blacklist_characters="@")))
def test_text_without_digits_or_at_signs_is_untouched(text: str) -> None:
    assert builtin(text) == text


def test_dates_and_prices_stay_and_bad_checksums_are_no_cards() -> None:
    text = "On 2024-01-05 it cost 1299.99 for 3 items"
    assert builtin(text) == text
    assert "[card]" not in builtin("order 4111111111111112 shipped")


def test_a_write_that_fails_drops_the_batch_and_serving_goes_on(reg: Registry) -> None:
    capture_on(reg)
    cap = Capture(reg, "r1")
    cap.refresh()
    cap.names["bot"].writer.current.mkdir(parents=True)  # the segment cannot be opened
    mw = CaptureMiddleware(answer_app("fine"), lambda: cap)
    assert chat(mw, "q")[0]["status"] == 200
    assert cap.drain() == 0 and cap.dropped == {"write_failed": 1}
    assert "cannot write captured records" in cap.errors["bot"]
    cap.names["bot"].writer.current.rmdir()  # space again: capture resumes by itself
    chat(mw, "q")
    assert cap.drain() == 1 and "bot" not in cap.errors
