"""Feedback bound to answers: ``POST /v1/adapters/{name}/feedback`` and the fleet's record of
the answers it issued.

The contract:

- An agent posts ``{"id": <the answer's id>, "score": -1..1, "correction": <the answer it
  should have given, optional>}`` (a ``model`` member is accepted for older clients and
  ignored). The id must be one the fleet issued and recorded for that name (every answer
  given while the name runs a canary, on either side, and every captured answer:
  ``server_plugin.capture``); anything else is a 404. A correction is kept only where the
  name captures (redacted, in its capture segments), at most ``MAX_CORRECTION_CHARS``.
  The version a score is counted for is the one the server recorded when it answered:
  labels never come from the client.
- One answer scores once: a later score for the same id replaces the earlier one, also when
  it arrives at another replica.
- Any replica accepts feedback for any replica's answer: each records the ids it issued in
  ``<name>/rollout/responses/<replica>.jsonl`` and the scores it received in
  ``<name>/rollout/feedback/<replica>.jsonl`` (``agent_finetune.registry.rollout``), and
  reads the others' on every pass, or at once when an id is not known yet.
- Bounded: at most ``MAX_ANSWERS`` ids and scores in memory (the oldest go first), at most
  ``MAX_OUTBOX`` records waiting to be written (more are dropped and counted), bodies of at
  most ``MAX_BODY_BYTES`` (413), parsed in a worker thread; nesting too deep to parse is a
  400, as is any other malformed body.

Under ``/v1``, so vLLM's ``--api-key`` check applies. It only records; it never routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from agent_finetune.errors import AgentFinetuneError, FeedbackError, UnknownResponseError
from agent_finetune.registry import Registry
from agent_finetune.registry.capture import MAX_CORRECTION_CHARS
from agent_finetune.registry.names import is_name, is_version
from agent_finetune.registry.rollout import FEEDBACK, RESPONSES, FleetLog, rollout_dir
from server_plugin import metrics
from server_plugin.canary_signals import Tally
from server_plugin.capture import Capture, Feedback
from server_plugin.http_errors import error_response

logger = logging.getLogger(__name__)

FEEDBACK_PATH = "/v1/adapters/{name}/feedback"
MAX_BODY_BYTES = 64 * 1024
MAX_ID_CHARS = 256
MAX_ANSWERS = 100_000
MAX_OUTBOX = 50_000
MAX_LOGS = 256
_FIELDS = frozenset({"id", "score", "model", "correction"})
_MERGE_BATCH = 2000


@dataclass(frozen=True)
class Answer:
    """An answer the fleet issued: the name and version that answered, under which canary."""

    name: str
    version: str
    canary_id: str | None


@dataclass
class _Score:
    score: float
    key: tuple[int, str]  # (time ns, replica): the latest replaces
    answer: Answer


def parse_feedback(data: Any) -> tuple[str, float]:
    """(response id, score) of a feedback body; FeedbackError says what is wrong."""
    rid, score, _ = parse_post(data)
    return rid, score


def parse_post(data: Any) -> tuple[str, float, str | None]:
    """(response id, score, correction or None) of a feedback body; FeedbackError."""
    if not isinstance(data, dict):
        raise FeedbackError('expected a JSON object {"id": <response id>, "score": -1..1}')
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise FeedbackError(
            f"unknown field(s) {', '.join(unknown)}: send only id, score and correction"
        )
    rid, score = data.get("id"), data.get("score")
    if not _is_id(rid):
        raise FeedbackError(
            '"id" must be the response id (the "id" field of the answer, '
            f"1-{MAX_ID_CHARS} printable characters)"
        )
    if isinstance(score, bool) or not isinstance(score, int | float) or not -1 <= score <= 1:
        raise FeedbackError(f'"score" must be a number from -1 (bad) to 1 (good), got {score!r}')
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise FeedbackError('"model" (ignored: the server knows) must be a string if sent')
    correction = data.get("correction")
    if correction is not None and (
        not isinstance(correction, str) or not 0 < len(correction) <= MAX_CORRECTION_CHARS
    ):
        raise FeedbackError(
            f'"correction" must be the answer the agent should have given: a string of 1-'
            f"{MAX_CORRECTION_CHARS} characters, or null"
        )
    return str(rid), float(score), correction


def _is_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_CHARS
        and value.isprintable()
        and value.strip() == value
    )


@dataclass
class FeedbackBook:
    """This replica's view of the fleet's answers and scores (what the guards count)."""

    registry: Registry
    replica: str
    max_answers: int = MAX_ANSWERS
    dropped: int = 0
    _answers: OrderedDict[str, Answer] = field(default_factory=OrderedDict)
    _scores: OrderedDict[str, _Score] = field(default_factory=OrderedDict)
    _tallies: dict[str, dict[str, Tally]] = field(default_factory=dict)
    _outbox: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    _logs: OrderedDict[tuple[str, str], FleetLog] = field(default_factory=OrderedDict)
    _io: threading.Lock = field(default_factory=threading.Lock)

    # -- answers --------------------------------------------------------------------------------
    def issued(self, answer_id: str, answer: Answer) -> None:
        """Remember an answer this replica gave, and queue it for the fleet's log."""
        if not _is_id(answer_id):
            return
        self._remember(answer_id, answer)
        entry = {"id": answer_id, "version": answer.version, "canary_id": answer.canary_id}
        self._queue(answer.name, RESPONSES, {**entry, "ts": time.time()})

    def lookup(self, name: str, answer_id: str) -> Answer | None:
        found = self._answers.get(answer_id)
        return found if found is not None and found.name == name else None

    def _remember(self, answer_id: str, answer: Answer) -> None:
        self._answers[answer_id] = answer
        self._answers.move_to_end(answer_id)
        while len(self._answers) > self.max_answers:
            self._answers.popitem(last=False)

    # -- scores ---------------------------------------------------------------------------------
    def score(self, name: str, answer_id: str, score: float) -> dict[str, Any]:
        """Record an agent's score for a known answer (UnknownResponseError otherwise)."""
        answer = self.lookup(name, answer_id)
        if answer is None:
            raise UnknownResponseError(
                f"no answer {answer_id!r} of {name} was recorded by this server fleet; "
                "feedback is accepted for the ids of answers given while a canary of the "
                "name runs (the answer's top-level id)"
            )
        key = (time.time_ns(), self.replica)
        replaced = self._apply(answer_id, score, key, answer)
        self._queue(
            name,
            FEEDBACK,
            {
                "id": answer_id,
                "score": score,
                "version": answer.version,
                "canary_id": answer.canary_id,
                "ts": key[0],
            },
        )
        sign = "negative" if score < 0 else "positive"
        metrics.CANARY_FEEDBACK.labels(name, answer.version, sign).inc()
        return {
            "name": name,
            "version": answer.version,
            "canary_id": answer.canary_id,
            "recorded": True,
            "replaced": replaced,
        }

    def _apply(self, answer_id: str, score: float, key: tuple[int, str], answer: Answer) -> bool:
        """Make ``score`` the answer's score unless a later one is known; True if it
        replaced an earlier score."""
        old = self._scores.get(answer_id)
        if old is not None and old.key >= key:
            return False
        if old is not None:
            self._tally(old.answer).change(old.score, -1)
        self._scores[answer_id] = _Score(score, key, answer)
        self._scores.move_to_end(answer_id)
        self._tally(answer).change(score, 1)
        while len(self._scores) > self.max_answers:
            self._scores.popitem(last=False)  # its tally stays: it was counted once
        return old is not None

    def _tally(self, answer: Answer) -> Tally:
        by_version = self._tallies.setdefault(answer.canary_id or "", {})
        return by_version.setdefault(answer.version, Tally())

    def tallies(self, canary_id: str) -> dict[str, Tally]:
        return self._tallies.get(canary_id, {})

    def keep_tallies(self, canary_ids: set[str]) -> None:
        """Forget the tallies of canaries that ended (their scores stay in the log)."""
        for cid in [c for c in self._tallies if c not in canary_ids]:
            del self._tallies[cid]

    # -- the fleet's logs -----------------------------------------------------------------------
    def _queue(self, name: str, kind: str, entry: dict[str, Any]) -> None:
        if sum(len(v) for v in self._outbox.values()) >= MAX_OUTBOX:
            self.dropped += 1
            return
        self._outbox.setdefault((name, kind), []).append(entry)

    def take_outbox(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        out, self._outbox = self._outbox, {}
        return out

    def _log(self, name: str, kind: str) -> FleetLog:
        key = (name, kind)
        log = self._logs.get(key)
        if log is None:
            folder = rollout_dir(self.registry.name_dir(name)) / kind
            log = self._logs[key] = FleetLog(folder, self.replica)
            while len(self._logs) > MAX_LOGS:
                self._logs.popitem(last=False)
        self._logs.move_to_end(key)
        return log

    def exchange(
        self, outbox: dict[tuple[str, str], list[dict[str, Any]]], names: set[str]
    ) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], list[str]]:
        """Blocking, in a worker thread: append this replica's queued records, then read
        what the other replicas appended for ``names``. Returns (new records by (name,
        kind), problems); records that could not be written are requeued by the caller."""
        problems: list[str] = []
        read: dict[tuple[str, str], list[dict[str, Any]]] = {}
        with self._io:
            for (name, kind), entries in outbox.items():
                try:
                    self._log(name, kind).append(entries)
                except (AgentFinetuneError, OSError) as e:
                    problems.append(f"{name}: cannot record {kind}: {e}")
            for name in names:
                if not (rollout_dir(self.registry.name_dir(name)) / RESPONSES).is_dir():
                    continue  # nothing recorded for it (or not a name): no log to follow
                for kind in (RESPONSES, FEEDBACK):
                    try:
                        read[(name, kind)] = self._log(name, kind).tail()
                    except (AgentFinetuneError, OSError) as e:
                        problems.append(f"{name}: cannot read {kind}: {e}")
        return read, problems

    async def merge(self, read: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        """Take in the other replicas' records (on the loop, yielding to it every
        ``_MERGE_BATCH`` records: a first read of a busy log must not stall serving)."""
        done = 0
        for (name, kind), entries in read.items():
            for e in entries:
                done += 1
                if done % _MERGE_BATCH == 0:
                    await asyncio.sleep(0)
                rid, version, cid = e.get("id"), e.get("version"), e.get("canary_id")
                if not _is_id(rid) or not is_version(version):
                    continue
                answer = Answer(name, str(version), cid if isinstance(cid, str) else None)
                if kind == RESPONSES:
                    self._remember(str(rid), answer)
                    continue
                score, ts = e.get("score"), e.get("ts")
                if (
                    isinstance(score, int | float)
                    and not isinstance(score, bool)
                    and math.isfinite(score)
                    and -1 <= score <= 1
                    and isinstance(ts, int)
                ):
                    self._apply(str(rid), float(score), (ts, "~other"), answer)


class PluginState(Protocol):
    """What the route reads from the plugin."""

    @property
    def canary(self) -> Any: ...

    @property
    def error(self) -> str | None: ...

    @property
    def capture(self) -> Capture | None: ...


class FeedbackRoute:
    """The route's handler, bound to the plugin whose canary router counts the scores."""

    def __init__(self, plugin: PluginState) -> None:
        self.plugin = plugin

    async def post(self, name: str, request: Request) -> Response:
        """An agent's score for one answer: ``{"id", "score": -1..1, "correction"?}``."""
        router = self.plugin.canary
        if router is None:
            return error_response(503, self.plugin.error or "agent_finetune plugin is starting")
        if not is_name(name):
            return error_response(404, f"no adapter named {name[:80]!r}", param="name")
        try:
            body = await _read_body(request)
            rid, score, correction = parse_post(await asyncio.to_thread(_parse_json, body))
        except _TooLarge:
            return error_response(
                413, f"feedback bodies are at most {MAX_BODY_BYTES} bytes", param=None
            )
        except FeedbackError as e:
            return error_response(400, f"feedback for {name}: {e}", param=None)
        except ClientDisconnect:
            return error_response(400, "the client went away mid-body", param=None)
        try:
            result = await router.feedback(name, rid, score)
        except UnknownResponseError as e:
            return error_response(404, str(e), param="id")
        capture = getattr(self.plugin, "capture", None)  # hosts without capture: none
        if capture is not None and name in capture.names:
            result["captured"] = capture.offer(Feedback(name, rid, score, correction, time.time()))
        return JSONResponse(result)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise FeedbackError("the body nests deeper than a feedback body can") from None
    except ValueError as e:
        raise FeedbackError(f"the body is not JSON: {e}") from None
