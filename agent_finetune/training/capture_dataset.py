"""A chat dataset from captured traffic and its feedback (``agent-finetune dataset build``).

Row by row, from the exchanges captured for a name (``agent_finetune.registry.capture``):

- rated at least ``min_score``: kept as answered (``rated_good``);
- with a correction and ``include_corrections``: kept with the correction as the answer
  (``corrected``), whatever the score;
- rated below ``min_score`` without a usable correction: dropped (``negative``, or
  ``correction_not_included``); never rated: dropped (``unrated``);
- roles the chat format does not take (tools): dropped (``unsupported_roles``);
- the same conversation and answer seen before: dropped (``duplicate``: byte-identical;
  ``near_duplicate``: identical once case, punctuation and spacing are normalised).

Rows are split into train and held-out by conversation, never by row: a conversation is
its system prompt and first user message (every later turn repeats them), hashed, so the
split is deterministic and all turns of a conversation land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_finetune.errors import DataError
from agent_finetune.registry.capture import read_capture
from agent_finetune.registry.names import utc_now
from agent_finetune.training.data import ROLES

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Text as near-duplicate detection compares it: NFKC, lowercase, no punctuation,
    single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def conversation_key(messages: list[dict[str, str]]) -> str:
    """The conversation a row belongs to: its system prompt and first user message."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return hashlib.sha256(f"{normalise(system)}\x00{normalise(first)}".encode()).hexdigest()


def is_heldout(conversation: str, share: float) -> bool:
    """Deterministic: the conversation hash, read as a fraction, below ``share``."""
    return int(conversation[:16], 16) / float(1 << 64) < share


@dataclass
class Built:
    """A built dataset: rows by side and what happened to every exchange."""

    train: list[dict[str, Any]] = field(default_factory=list)
    heldout: list[dict[str, Any]] = field(default_factory=list)
    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    conversations: dict[str, set[str]] = field(
        default_factory=lambda: {"train": set(), "heldout": set()}
    )
    segments: list[str] = field(default_factory=list)
    skipped_lines: int = 0
    corrections: dict[str, str] = field(default_factory=dict)
    """Question -> normalised corrected answer (both sides): what ``merge_rows`` replaces."""


def _choose(
    exchange: dict[str, Any],
    feedback: dict[str, Any] | None,
    min_score: float,
    include_corrections: bool,
) -> tuple[str | None, str]:
    """(the answer to train on or None, the reason kept or dropped)."""
    if feedback is None:
        return None, "unrated"
    correction = feedback.get("correction")
    if correction and include_corrections:
        return correction, "corrected"
    if feedback["score"] >= min_score:
        return exchange["answer"], "rated_good"
    return None, "correction_not_included" if correction else "negative"


def build_rows(
    name_dir: Path,
    *,
    since: float | None = None,
    min_score: float = 0.5,
    include_corrections: bool = False,
    heldout_share: float = 0.1,
) -> Built:
    """Select, deduplicate and split the captured exchanges of one name."""
    if not 0 <= heldout_share < 1:
        raise DataError(f"--heldout-share {heldout_share}: must be from 0 to below 1")
    log = read_capture(name_dir, since)
    built = Built(segments=log.segments, skipped_lines=log.skipped)
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    for exchange, feedback in log.joined():
        answer, reason = _choose(exchange, feedback, min_score, include_corrections)
        if answer is None:
            built.dropped[reason] += 1
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in exchange["messages"]]
        if any(m["role"] not in ROLES for m in prompt) or prompt[-1]["role"] == "assistant":
            built.dropped["unsupported_roles"] += 1
            continue
        messages = [*prompt, {"role": "assistant", "content": answer}]
        exact = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        near = "\x00".join(f"{m['role']}:{normalise(m['content'])}" for m in messages)
        if exact in seen_exact:
            built.dropped["duplicate"] += 1
            continue
        if near in seen_near:
            built.dropped["near_duplicate"] += 1
            continue
        seen_exact.add(exact)
        seen_near.add(near)
        conversation = conversation_key(messages)
        side = "heldout" if is_heldout(conversation, heldout_share) else "train"
        (built.heldout if side == "heldout" else built.train).append({"messages": messages})
        built.conversations[side].add(conversation)
        built.kept[reason] += 1
        if reason == "corrected":
            built.corrections[prompt_key({"messages": messages})] = normalise(answer)
        built.versions[exchange["version"]] += 1
    return built


def outputs(out: Path) -> tuple[Path, Path]:
    """(held-out file, provenance file) written beside the train file ``out``."""
    stem = out.name.removesuffix(".jsonl").removesuffix(".json")
    return out.with_name(f"{stem}.heldout.jsonl"), out.with_name(f"{stem}.provenance.json")


def write_dataset(built: Built, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write train rows to ``out``, held-out rows and the provenance beside it; returns
    the provenance."""
    heldout_path, provenance_path = outputs(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, rows in ((out, built.train), (heldout_path, built.heldout)):
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    provenance = {
        "built": utc_now(),
        **settings,
        "train": {"path": str(out), "rows": len(built.train)},
        "heldout": {"path": str(heldout_path), "rows": len(built.heldout)},
        "conversations": {k: len(v) for k, v in built.conversations.items()},
        "kept": dict(built.kept),
        "dropped": dict(built.dropped),
        "versions": dict(built.versions),
        "segments": built.segments,
        "skipped_lines": built.skipped_lines,
    }
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


def since_epoch(age_s: float | None) -> float | None:
    return None if age_s is None else time.time() - age_s


def prompt_key(row: dict[str, Any]) -> str:
    """A row's question as merging compares it: its non-system turns, normalised."""
    turns = [m for m in row["messages"][:-1] if m["role"] != "system"]
    return "\x00".join(f"{m['role']}:{normalise(m['content'])}" for m in turns)


def merge_rows(
    base: list[dict[str, Any]],
    captured: list[dict[str, Any]],
    corrections: Mapping[str, str],
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The base rows (the live version's data, ``--data``) with the captured ones.

    A correction (``Built.corrections``, held-out ones included) of a question a base row
    asks, with another answer, replaces that row: the correction is the newer truth (a fact
    changed). A captured row a base row already answers alike adds nothing. Returns (rows,
    counts of what happened).
    """
    answers = corrections
    counts: Counter[str] = Counter()
    kept: list[dict[str, Any]] = []
    known: set[tuple[str, str]] = set()
    for row in base:
        key, answer = prompt_key(row), normalise(row["messages"][-1]["content"])
        if key in answers and answers[key] != answer:
            counts["base_replaced"] += 1
            continue
        kept.append(row)
        known.add((key, answer))
    for row in captured:
        pair = (prompt_key(row), normalise(row["messages"][-1]["content"]))
        if pair in known:
            counts["captured_known"] += 1
            continue
        known.add(pair)
        kept.append(row)
        counts["captured_added"] += 1
    return kept, counts
