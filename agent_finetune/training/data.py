"""Load training rows from JSON, JSONL or CSV files and normalise them.

Accepted row shapes, detected per file (after ``field_map`` renames columns):

- ``instruction`` / ``response``            (the seed guide's format)
- ``prompt`` / ``completion``
- ``input`` / ``output``
- ``instruction`` + ``input`` + ``output``  (Alpaca)
- ``messages``: a list of {role, content}   (chat)

Every bad row is an error naming the file, the line or row, and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent_finetune.errors import DataError

Format = Literal["instruction", "prompt", "io", "alpaca", "chat"]
ROLES = {"system", "user", "assistant"}
# (format, required keys) in detection order: most specific first.
_SHAPES: list[tuple[Format, tuple[str, ...]]] = [
    ("chat", ("messages",)),
    ("alpaca", ("instruction", "input", "output")),
    ("instruction", ("instruction", "response")),
    ("prompt", ("prompt", "completion")),
    ("io", ("input", "output")),
]
_FORMAT_HELP = (
    "expected keys instruction+response, prompt+completion, input+output, "
    "instruction+input+output, or messages; map other names with field_map"
)


@dataclass
class Example:
    """One training row: chat ``messages`` ending in the assistant answer, plus the row's
    string fields (``instruction``, ``response``, ``input`` and any others) for templates."""

    messages: list[dict[str, str]]
    fields: dict[str, str] = field(default_factory=dict)
    where: str = ""

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Dataset:
    """Rows of one file, its detected format and a fingerprint of its bytes."""

    path: Path
    format: Format
    examples: list[Example]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.examples)

    def split(self, test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
        """Seeded shuffle-split; the eval part may be empty for tiny datasets."""
        if not 0 <= test_fraction < 1:
            raise DataError(f"train_test_split={test_fraction}: must be in [0, 1)")
        rows = list(self.examples)
        random.Random(seed).shuffle(rows)
        n_eval = int(len(rows) * test_fraction)
        return rows[n_eval:], rows[:n_eval]

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "rows": len(self.examples),
            "sha256": self.fingerprint,
        }


def _read_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """(location, raw row) pairs from a file's text."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{i}: invalid JSON line: {e.msg} (column {e.colno})"
                ) from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects or one object")
        return [(f"{path} item {i}", row) for i, row in enumerate(data, 1)]
    if suffix in {".csv", ".tsv"}:
        reader = csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        header: list[str] | None = None
        rows = []
        for record in reader:
            lineno = reader.line_num
            if header is None:
                header = [h.strip() for h in record]
                if not any(header):
                    raise DataError(f"{path}:1: empty CSV header; {_FORMAT_HELP}")
                continue
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                raise DataError(
                    f"{path}:{lineno}: row has {len(record)} columns, header has {len(header)} "
                    f"({', '.join(header)}); quote fields that contain commas"
                )
            rows.append((f"{path}:{lineno}", dict(zip(header, record, strict=True))))
        return rows
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .csv")


def detect_format(keys: set[str]) -> Format | None:
    for fmt, required in _SHAPES:
        if set(required) <= keys:
            return fmt
    return None


def _text(row: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    text = str(value)
    if not allow_empty and not text.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return text


def _chat_messages(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise DataError(
                f"{where}: messages[{j}] must be {{role: system|user|assistant, content: text}}, "
                f"got {m!r:.80}"
            )
        out.append(
            {
                "role": str(m["role"]),
                "content": _text(
                    m, "content", f"{where} messages[{j}]", allow_empty=m["role"] != "assistant"
                ),
            }
        )
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer to train on")
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"{where}: messages has no user turn")
    return out


def normalise_row(raw: Any, fmt: Format, where: str, system_prompt: str | None = None) -> Example:
    """Turn one raw row into an Example; raise DataError naming ``where`` if it is bad."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(raw).__name__}")
    if fmt == "chat":
        messages = _chat_messages(raw, where)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        users = [m["content"] for m in messages if m["role"] == "user"]
        fields = {"instruction": users[-1], "response": messages[-1]["content"], "input": ""}
        return Example(messages, fields, where)
    if fmt == "alpaca":
        instruction = _text(raw, "instruction", where)
        inp = _text(raw, "input", where, allow_empty=True)
        response = _text(raw, "output", where)
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    else:
        prompt_key, response_key = {
            "instruction": ("instruction", "response"),
            "prompt": ("prompt", "completion"),
            "io": ("input", "output"),
        }[fmt]
        instruction = user = _text(raw, prompt_key, where)
        response = _text(raw, response_key, where)
        inp = ""
    fields = {k: str(v) for k, v in raw.items() if isinstance(v, str | int | float)}
    fields.update({"instruction": instruction, "input": inp, "response": response})
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(messages, fields, where)


def load_dataset_file(
    path: str | os.PathLike[str],
    *,
    field_map: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> Dataset:
    """Read and validate every row of a dataset file (UTF-8, with or without BOM)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"dataset {p} not found") from None
    except IsADirectoryError:
        raise DataError(f"dataset {p} is a folder; pass a .json, .jsonl or .csv file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 (byte {e.start}); save the file as UTF-8") from None
    rows = _read_rows(p, text)
    if not rows:
        raise DataError(f"{p}: no rows; the dataset is empty")
    mapping = dict(field_map or {})
    if mapping:
        rows = [
            (w, {mapping.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r)
            for w, r in rows
        ]
    first_where, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(
            f"{first_where}: expected an object with fields, got {type(first).__name__}"
        )
    fmt = detect_format(set(first))
    if fmt is None:
        raise DataError(
            f"{first_where}: cannot tell the format from keys {sorted(first)}; {_FORMAT_HELP}"
        )
    examples = [normalise_row(raw, fmt, where, system_prompt) for where, raw in rows]
    return Dataset(p, fmt, examples, hashlib.sha256(data).hexdigest())
