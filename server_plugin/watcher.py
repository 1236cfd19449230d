"""Wake the reconcile loop when anything in the registry changes.

Captured traffic (``<name>/capture/`` segments, appended all the time while a name
captures) never wakes it: nothing the loop serves depends on it.

Only a hint: the loop also resyncs periodically, so a missed event (network filesystems
send none; a folder moved in from outside arrives as a created event) costs at most one
resync interval. Knows nothing about vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from agent_finetune.registry.capture import CAPTURE, SETTINGS

logger = logging.getLogger(__name__)

# Reads (ours included) emit opened/closed_no_write events: waking on those would loop.
_WAKING_EVENTS = frozenset({"created", "deleted", "moved", "modified", "closed"})
_QUIET_FILES = frozenset({".lock", "history.jsonl"})


class _Handler(FileSystemEventHandler):
    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _WAKING_EVENTS:
            return
        path = event.src_path
        where = Path(path if isinstance(path, str) else path.decode())
        name = where.name
        if name in _QUIET_FILES and event.event_type in {"modified", "closed"}:
            return
        if name == CAPTURE or (where.parent.name == CAPTURE and name != SETTINGS):
            return  # capture segments: written all the time, read by no loop
        try:
            self._wake()
        except Exception:  # never let a callback kill the observer thread
            logger.exception("agent_finetune: waking the reconcile loop failed")


class RegistryWatcher:
    """A watchdog observer on the registry root that calls ``wake`` on every change."""

    def __init__(
        self,
        root: Path,
        wake: Callable[[], None],
        *,
        polling: bool = False,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.root = root
        self._wake = wake
        self._polling = polling
        self._poll_interval_s = poll_interval_s
        self._observer: Any = None

    @property
    def running(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def start(self) -> bool:
        """Start watching; False (and retry later) while the root folder does not exist."""
        if self.running:
            return True
        self.stop()
        if not self.root.is_dir():
            return False
        observer = PollingObserver(timeout=self._poll_interval_s) if self._polling else Observer()
        observer.daemon = True
        try:
            observer.schedule(_Handler(self._wake), str(self.root), recursive=True)
            observer.start()
        except Exception:
            logger.exception(
                "agent_finetune: cannot watch %s; relying on the periodic resync "
                "(set AGENT_FINETUNE_POLLING=1 on network filesystems)",
                self.root,
            )
            return False
        self._observer = observer
        return True

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            try:
                observer.stop()
                if observer.is_alive():
                    observer.join(timeout=5)
            except Exception:
                logger.exception("agent_finetune: stopping the registry watcher failed")
