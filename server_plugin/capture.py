"""Capture of sampled chat completions (and their feedback) into the registry.

Opt-in per adapter name (``agent_finetune.registry.capture`` holds the settings and the
segment format). Nothing heavy happens on the request's path:

- ``CaptureMiddleware`` (chat completions only) does nothing unless some name has capture
  on. Then it reads the body (at most ``MAX_REQUEST_BYTES``), tests it for a captured name
  with a substring search, draws the name's ``sample``, keeps the answer's body messages as
  they pass (at most ``MAX_ANSWER_BYTES``, streamed or not) and, once the answer ended with a
  200, appends the raw bytes to a bounded queue (``MAX_QUEUE``): when it is full the record
  is dropped and counted (``agent_finetune_capture_dropped{reason="queue_full"}``).
- One writer thread (``Capture.run``) parses the request and the answer (assembling a
  streamed answer's deltas), redacts every text (``server_plugin.redaction``), and appends
  to this replica's segment; it re-reads the settings every ``resync_s`` and enforces the
  disk and age bounds. A write that fails (a full disk) drops that batch and is counted:
  capture stops, serving never does.

The response id of a captured answer is handed to the feedback book (``on_issued``), so the
feedback route accepts it on any replica. No vLLM import here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_finetune.errors import AgentFinetuneError
from agent_finetune.registry import Registry
from agent_finetune.registry.capture import (
    CAPTURE,
    EXCHANGE,
    FEEDBACK,
    SETTINGS,
    CaptureSettings,
    SegmentWriter,
    capture_dir,
    enforce,
    read_settings,
)
from agent_finetune.registry.names import split_model
from server_plugin import metrics
from server_plugin.answers import answer_fields
from server_plugin.bodies import read_capped
from server_plugin.redaction import Redactor, load_hook, redactor

logger = logging.getLogger(__name__)

CHAT_ROUTE = "/v1/chat/completions"
MAX_QUEUE = 10_000
MAX_REQUEST_BYTES = 1 << 20
MAX_ANSWER_BYTES = 1 << 20
_ENFORCE_EVERY_S = 5.0
_IDLE_S = 0.02

OnIssued = Callable[[str, str, str], None]
"""(name, response id, version): an answer was captured; feedback may name it."""


@dataclass
class Exchange:
    """A captured request and its answer, as raw bytes (parsed by the writer)."""

    name: str
    request: bytes
    answer: list[bytes]
    latency_s: float
    time: float


@dataclass
class Feedback:
    name: str
    id: str
    score: float
    correction: str | None
    time: float


@dataclass
class _Name:
    settings: CaptureSettings
    redact: Redactor | None
    writer: SegmentWriter
    needle: tuple[bytes, bytes]
    error: str | None = None


@dataclass
class Capture:
    """This replica's capture: which names capture, the queue, and the writer."""

    registry: Registry
    replica: str
    max_queue: int = MAX_QUEUE
    rng: random.Random = field(default_factory=random.Random)
    on_issued: OnIssued | None = None
    names: dict[str, _Name] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _queue: deque[Exchange | Feedback] = field(default_factory=deque)
    _hooks: dict[str, Redactor | str] = field(default_factory=dict)
    _enforced: float = 0.0
    _count_lock: threading.Lock = field(default_factory=threading.Lock)

    # -- request path (event loop) --------------------------------------------------------------
    def pick(self, body: bytes) -> str | None:
        """The captured name the body mentions, if this request is sampled (else None)."""
        for name, n in self.names.items():
            if n.needle[0] in body or n.needle[1] in body:
                return name if self.rng.random() < n.settings.sample else None
        return None

    def offer(self, item: Exchange | Feedback) -> bool:
        """Queue a record for the writer; a full queue drops it (counted)."""
        if len(self._queue) >= self.max_queue:
            self.drop("queue_full")
            return False
        self._queue.append(item)
        return True

    def issued(self, name: str, first: bytes) -> None:
        """Tell the feedback book about a captured answer (its id and version)."""
        if self.on_issued is None:
            return
        fields = answer_fields(first)
        version = _version_of(name, fields.get("model"))
        if version is not None and fields.get("id"):
            self.on_issued(name, fields["id"], version)

    def drop(self, reason: str) -> None:
        with self._count_lock:  # the loop and the writer both drop
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        metrics.CAPTURE_DROPPED.labels(reason).inc()

    # -- writer thread --------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read every name's capture settings (cheap: one small file per name)."""
        found: dict[str, _Name] = {}
        bad: set[str] = set()
        names, _ = self.registry.scan("any")  # no stat each; the reconciler reports bad entries
        root = str(self.registry.root)
        for name in names:
            # One stat per name, no Path objects: 10,000 names every pass (BENCHMARKS.md).
            if not os.path.exists(f"{root}/{name}/{CAPTURE}/{SETTINGS}"):
                continue
            try:
                s = read_settings(self.registry.name_dir(name))
            except AgentFinetuneError as e:
                self.errors[name] = str(e)
                bad.add(name)
                continue
            if s is None or not s.enabled:
                continue
            old = self.names.get(name)
            writer = old.writer if old is not None else None
            if writer is None:
                writer = SegmentWriter(capture_dir(self.registry.name_dir(name)), self.replica)
            writer.segment_bytes = s.segment_bytes
            hook = self._hook(s.redact) if s.redact else None
            entry = _Name(s, None, writer, (f'"{name}"'.encode(), f'"{name}@'.encode()))
            if isinstance(hook, str):
                entry.error = hook
                self.errors[name] = hook
            else:
                entry.redact = redactor(hook)
                self.errors.pop(name, None)
            found[name] = entry
        self.names = found  # one assignment: the loop sees the old dict or the new
        for name in [n for n in self.errors if n not in found and n not in bad]:
            self.errors.pop(name, None)  # capture stopped, or the name left the registry

    def _hook(self, spec: str) -> Redactor | str:
        """The user hook, or the text of why it cannot be loaded (records are then dropped;
        tried again every pass, so installing the module later needs no restart)."""
        found = self._hooks.get(spec)
        if found is not None and not isinstance(found, str):
            return found
        try:
            self._hooks[spec] = load_hook(spec)
        except Exception as e:
            problem = f"capture redact hook {spec}: {type(e).__name__}: {e}"
            if found != problem:  # logged once, not every pass
                logger.error("agent_finetune: %s; nothing is captured until it loads", problem)
            self._hooks[spec] = problem
        return self._hooks[spec]

    def drain(self) -> int:
        """Write what is queued (one append per name); returns the records written."""
        batches: dict[str, list[dict[str, Any]]] = {}
        while self._queue:
            item = self._queue.popleft()
            entry = self.names.get(item.name)
            if entry is None:
                continue  # capture stopped meanwhile
            record = self._record(item, entry)
            if record is not None:
                batches.setdefault(item.name, []).append(record)
        done = 0
        for name, records in batches.items():
            try:
                self.names[name].writer.append(records)
            except (AgentFinetuneError, OSError) as e:
                self.errors[name] = f"cannot write captured records: {e}"
                for _ in records:
                    self.drop("write_failed")
                continue
            done += len(records)
            self.errors.pop(name, None)  # written again (a full disk was freed)
            self.written[name] = self.written.get(name, 0) + len(records)
            for r in records:
                metrics.CAPTURE_RECORDS.labels(name, r["kind"]).inc()
        return done

    def _record(self, item: Exchange | Feedback, entry: _Name) -> dict[str, Any] | None:
        if entry.redact is None:
            self.drop("redact_failed")
            return None
        try:
            if isinstance(item, Feedback):
                correction = entry.redact(item.correction) if item.correction else None
                return {
                    "kind": FEEDBACK,
                    "id": item.id,
                    "time": item.time,
                    "score": item.score,
                    "correction": correction,
                    "replica": self.replica,
                }
            parsed = parse_exchange(item)
            if parsed is None:
                self.drop("unparsable")
                return None
            parsed["messages"] = [
                {**m, "content": entry.redact(m["content"])} for m in parsed["messages"]
            ]
            parsed["answer"] = entry.redact(parsed["answer"])
        except Exception:
            logger.exception("agent_finetune: redacting a captured record of %s failed", item.name)
            self.drop("redact_failed")
            return None
        return {**parsed, "replica": self.replica}

    def enforce_bounds(self) -> None:
        for name, entry in list(self.names.items()):
            s = entry.settings
            try:
                enforce(entry.writer.folder, s.max_bytes, s.max_age_s)
            except AgentFinetuneError as e:
                self.errors[name] = str(e)

    def pass_once(self, now: float, refresh: bool) -> None:
        if refresh:
            self.refresh()
        if self.drain() or now - self._enforced >= _ENFORCE_EVERY_S:
            self._enforced = now
            self.enforce_bounds()

    def run(self, stop: threading.Event, resync_s: float) -> None:
        """The writer thread: drain the queue, re-read settings, hold the bounds."""
        last = 0.0
        while not stop.is_set():
            now = time.monotonic()
            try:
                self.pass_once(now, refresh=now - last >= resync_s)
            except Exception:
                logger.exception("agent_finetune: capture pass failed")
            if now - last >= resync_s:
                last = now
            if not self._queue:
                stop.wait(_IDLE_S)

    def status(self) -> dict[str, Any]:
        return {
            "names": {n: e.settings.as_dict() for n, e in self.names.items()},
            "queued": len(self._queue),
            "written": dict(self.written),
            "dropped": dict(self.dropped),
            "errors": dict(self.errors),
        }


def _version_of(name: str, model: str | None) -> str | None:
    parsed = split_model((model or "").partition("+")[0])
    return parsed[1] if parsed is not None and parsed[0] == name else None


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        texts = [p for p in parts if isinstance(p, str)]
        return "".join(texts) if texts else None
    return None


def _answer_of(chunks: list[bytes]) -> tuple[str, str, str] | None:
    """(id, model, text) of a chat answer: one JSON body, or an SSE stream of deltas."""
    data = b"".join(chunks)
    if data.lstrip().startswith(b"{"):
        body = json.loads(data)
        text = _text(body["choices"][0]["message"].get("content"))
        return (body["id"], body["model"], text) if text is not None else None
    rid = model = None
    parts: list[str] = []
    for line in data.split(b"\n"):
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        rid, model = rid or event.get("id"), model or event.get("model")
        for choice in event.get("choices") or []:
            if choice.get("index", 0) == 0:
                piece = (choice.get("delta") or {}).get("content")
                if isinstance(piece, str):
                    parts.append(piece)
    return (rid, model, "".join(parts)) if rid and model else None


def parse_exchange(item: Exchange) -> dict[str, Any] | None:
    """The exchange record of raw request/answer bytes (unredacted), or None when either
    is not a chat completion of ``item.name`` this server answered."""
    try:
        request = json.loads(item.request)
        answer = _answer_of(item.answer)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return None
    if not isinstance(request, dict) or answer is None:
        return None
    rid, model, text = answer
    version = _version_of(item.name, model)
    raw = request.get("messages")
    if version is None or not isinstance(rid, str) or not isinstance(raw, list):
        return None
    messages = []
    for m in raw:
        content = _text(m.get("content")) if isinstance(m, dict) else None
        if content is None or not isinstance(m.get("role"), str):
            continue
        messages.append({"role": m["role"], "content": content})
    if not messages:
        return None
    return {
        "kind": EXCHANGE,
        "id": rid,
        "time": item.time,
        "version": version,
        "messages": messages,
        "answer": text,
        "latency_s": round(item.latency_s, 6),
    }


class CaptureMiddleware:
    """Keep sampled chat completions of captured names for the writer (module docstring)."""

    def __init__(self, app: ASGIApp, capture: Callable[[], Capture | None]) -> None:
        self.app = app
        self.capture = capture

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap = self.capture()
        if (
            cap is None
            or not cap.names
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"].removeprefix(scope.get("root_path", "")) != CHAT_ROUTE
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        messages, body = await read_capped(receive, MAX_REQUEST_BYTES)
        pending = deque(messages)

        async def replay() -> Message:
            return pending.popleft() if pending else await receive()

        name = cap.pick(body) if body is not None else None
        if name is None:
            await self.app(scope, replay, send)
            return
        chunks: list[bytes] = []
        state = {"status": 0, "size": 0}

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = int(message.get("status", 0))
            elif message["type"] == "http.response.body" and state["size"] <= MAX_ANSWER_BYTES:
                data = bytes(message.get("body", b""))
                state["size"] += len(data)
                chunks.append(data)
            await send(message)

        await self.app(scope, replay, watching)
        if state["status"] != 200 or not chunks or body is None:
            return
        if state["size"] > MAX_ANSWER_BYTES:
            cap.drop("too_large")
            return
        cap.issued(name, chunks[0])
        latency = time.perf_counter() - started
        cap.offer(Exchange(name, body, chunks, latency, time.time()))
