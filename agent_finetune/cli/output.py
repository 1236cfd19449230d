"""Output for people and machines: aligned tables and JSON on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A plain aligned table for people."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    # One write: a print per row is slow at 10,000 names (BENCHMARKS.md, "Scale").
    sys.stdout.write("\n".join(lines) + "\n")


def emit_json(data: Any) -> None:
    """Pretty JSON on stdout, the only thing a ``--json`` command prints there."""
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
