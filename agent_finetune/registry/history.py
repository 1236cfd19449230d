"""``history.jsonl``: what its entries mean, and who writes them.

Every entry has ``ts``, ``user``, ``host``, ``action``, ``from``, ``to`` and ``reason``.
Pointer moves (``POINTER_MOVES``) say where ``current`` went; the other actions (publish,
gc, gate, canary_*) record decisions that move nothing.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from typing import Any

from agent_finetune.registry.files import parse_jsonl
from agent_finetune.registry.names import check_version, is_version

# History actions that move ``current``. "rollback" returns to a version (popping back to it
# when it is on the stack of past currents); the others push, so a rollback after them goes
# back to what was current before. "recover" logs a move whose writer died before logging it.
POINTER_MOVES = ("promote", "rollback", "recover", "fsck")
CANARY_START = "canary_start"
CANARY_ENDS = ("canary_abort", "canary_promote")


def parse_history(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(entries, unparsable lines) of a history file's text."""
    return parse_jsonl(text)


def parse_pointer(data: bytes) -> str | None:
    """The version a ``current`` file's bytes point to; None when they are not a pointer."""
    try:
        return check_version(json.loads(data)["version"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def current_stack(history: list[dict[str, Any]]) -> list[str]:
    """Versions that were current, oldest first, with rolled-back-from entries popped."""
    stack: list[str] = []
    for e in history:
        to, action = e.get("to"), e.get("action")
        if not isinstance(to, str) or action not in POINTER_MOVES:
            continue
        if action != "rollback" or to not in stack:
            stack.append(to)
        else:
            while stack[-1] != to:
                stack.pop()
    return stack


def text(value: Any) -> str | None:
    """A field that should be text (a version, an id), None when absent or not a string:
    history lines and the canary file may be hand-edited."""
    return value if isinstance(value, str) else None


def last_pointer_move(history: list[dict[str, Any]]) -> str | None:
    """The version the last logged pointer move went to."""
    for e in reversed(history):
        if e.get("action") in POINTER_MOVES:
            return text(e.get("to"))
    return None


def highest_number(history: list[dict[str, Any]], folders: list[str]) -> int:
    """The highest version number the history or the given folder names mention."""
    seen: list[Any] = list(folders)
    for e in history:
        seen += [e.get("to"), *list(e.get("deleted") or [])]
    return max((int(v[1:]) for v in seen if is_version(v)), default=0)


def open_canary_ids(history: list[dict[str, Any]]) -> list[str]:
    """Ids of canaries the history shows started and not (yet) ended, oldest first."""
    started: dict[str, None] = {}
    for e in history:
        cid = e.get("canary_id")
        if not isinstance(cid, str):
            continue
        if e.get("action") == CANARY_START:
            started[cid] = None
        elif e.get("action") in CANARY_ENDS:
            started.pop(cid, None)
    return list(started)


def actor() -> dict[str, str]:
    """Who is writing: the ``user`` and ``host`` stamped on history and eval records."""
    return {"user": _user(), "host": socket.gethostname()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
