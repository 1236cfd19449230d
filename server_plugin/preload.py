"""Which adapter names a server loads before their first request: ``AGENT_FINETUNE_PRELOAD``.

=============  ===========================================================================
``auto``       (default) ``all`` while every name fits the engine's adapter bound
               (``--max-cpu-loras`` minus ``AGENT_FINETUNE_MAX_PINNED``), else
               ``recent:<that bound>``.
``all``        every name: start-up copies and loads every current version.
``none``       no name: each loads on its first request.
``recent:N``   the N names used most recently (this host's usage record in the cache
               folder; names never used rank by their last pointer move).
``a,b,c``      these names.
=============  ===========================================================================

A name that is not preloaded is *lazy*: start-up reads only its metadata, ``/v1/models``
lists it, and its first request loads its current version before vLLM looks the name up
(the same copy, verify and load path as a pinned ``name@vNNNN``). Concurrent first
requests share one load; loads run at most ``AGENT_FINETUNE_MAX_LOADS`` at a time. A lazy
name that was loaded stays loaded and follows ``current`` like a preloaded one, in an LRU
of ``capacity`` names: the least recently used is unloaded when a new one needs room, so
the server's copies stay bounded (and the byte bound, ``AGENT_FINETUNE_CACHE_MAX_BYTES``,
evicts them once released). Engine memory is vLLM's own LRU of ``--max-cpu-loras``.

No vLLM import here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent_finetune.errors import ConfigError
from agent_finetune.registry.files import write_atomic
from agent_finetune.registry.names import is_name

logger = logging.getLogger(__name__)

Mode = Literal["auto", "all", "none", "recent", "names"]

USAGE_FILE = "usage.json"
"""Per cache root: adapter name -> when this host last served a request for it (epoch s)."""
_SAVE_EVERY_S = 30.0


@dataclass(frozen=True)
class PreloadPolicy:
    """A parsed ``AGENT_FINETUNE_PRELOAD`` value."""

    mode: Mode = "auto"
    count: int = 0
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: str | None) -> PreloadPolicy:
        """Parse a policy; ConfigError naming the bad part and the choices (the caller
        names the variable or flag it came from)."""
        value = (raw or "").strip()
        low = value.lower()
        if low in ("", "auto"):
            return cls("auto")
        if low in ("all", "none"):
            return cls(low)  # type: ignore[arg-type]
        if low.startswith("recent:"):
            try:
                count = int(low.partition(":")[2])
            except ValueError:
                count = -1
            if count < 0:
                raise ConfigError(f"{raw!r}: expected recent:N with N >= 0, e.g. recent:64")
            return cls("recent", count=count)
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        bad = [n for n in names if not is_name(n)]
        if bad or not names:
            raise ConfigError(
                f"{raw!r}: {', '.join(map(repr, bad)) or 'empty'} is not an adapter name; "
                "expected auto, all, none, recent:N or a comma-separated list of names"
            )
        return cls("names", names=names)

    def __str__(self) -> str:
        if self.mode == "recent":
            return f"recent:{self.count}"
        if self.mode == "names":
            return ",".join(self.names)
        return self.mode

    def resolve(self, n_names: int, bound: int) -> PreloadPolicy:
        """``auto`` made concrete for ``n_names`` names and room for ``bound`` adapters."""
        if self.mode != "auto":
            return self
        return PreloadPolicy("all") if n_names <= bound else PreloadPolicy("recent", bound)

    def choose(
        self, moved_at: Mapping[str, float | None], used_at: Mapping[str, float]
    ) -> frozenset[str] | None:
        """The names to preload among ``moved_at``'s keys (None: every name, now and later).

        ``recent:N`` ranks by last use, then by last pointer move; ties by name.
        """
        if self.mode in ("all", "auto"):
            return None
        if self.mode == "none":
            return frozenset()
        if self.mode == "names":
            return frozenset(self.names)
        ranked = sorted(
            moved_at,
            key=lambda n: (-used_at.get(n, 0.0), -(moved_at[n] or 0.0), n),
        )
        return frozenset(ranked[: self.count])


class Usage:
    """When each name was last requested on this host, kept across restarts.

    The record lives beside the per-process cache folders, in the cache root: written at
    most every 30 s (and at exit), atomically; a missing or unreadable one is empty.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.used_at: dict[str, float] = {}
        self._dirty = False
        self._saved = time.monotonic()
        if path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.used_at = {
                    k: float(v)
                    for k, v in data.items()
                    if is_name(k) and isinstance(v, (int, float))
                }

    def touch(self, name: str) -> None:
        self.used_at[name] = time.time()
        self._dirty = True

    def save(self, force: bool = False) -> None:
        """Write the record if it changed and 30 s passed (or ``force``); never raises."""
        if self.path is None or not self._dirty:
            return
        if not force and time.monotonic() - self._saved < _SAVE_EVERY_S:
            return
        try:
            # Merge with what other servers on this host wrote since.
            merged = dict(Usage(self.path).used_at)
            for k, v in self.used_at.items():
                merged[k] = max(v, merged.get(k, 0.0))
            write_atomic(self.path, json.dumps(merged).encode(), durable=False)
            self._dirty, self._saved = False, time.monotonic()
        except OSError as e:
            logger.warning("agent_finetune: cannot write %s: %s", self.path, e)
