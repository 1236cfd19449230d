"""What ``GET /v1/adapters`` reports for one adapter name, and its state transitions.

Every change of a name's state goes through the methods here, so a failure is shown, and
cleared, the same way whichever road (the reconcile loop, a request) changed it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from server_plugin.failures import Failure, FailureKind

State = Literal["pending", "loading", "live", "failed", "retrying", "lazy"]


def utc_at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class AdapterStatus:
    """One adapter name: desired and live version, state, last error, load times."""

    name: str
    desired: str | None = None
    desired_since: str | None = None  # when `current` last moved (the pointer's mtime)
    live: str | None = None
    state: State = "pending"
    error: str | None = None
    error_version: str | None = None
    error_kind: FailureKind | None = None
    attempts: int = 0
    next_retry: str | None = None
    absent_passes: int = 0
    sha256: str | None = None
    loaded_at: str | None = None
    load_seconds: float | None = None
    swap_seconds: float | None = None
    # Whether the last swap had to load its version (False: it was staged or on standby,
    # the swap only repointed the name).
    swap_loaded: bool | None = None
    path: str | None = None
    # Versions loaded ahead of going live (``server_plugin.staging``), only ones the server
    # really has loaded, and the ones that failed to stage: version, why (next, canary,
    # rollback), state (staged, failed), load_seconds, loaded_at, error.
    staged: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settle(self, state: State) -> None:
        """``state`` with no failure shown: a success, or nothing left to do."""
        self.state, self.attempts, self.next_retry = state, 0, None
        self.error = self.error_version = self.error_kind = None

    def show(self, failure: Failure, version: str) -> None:
        """``version``'s failure: ``failed`` (permanent) or ``retrying`` (transient)."""
        self.state = "failed" if failure.kind == "permanent" else "retrying"
        self.error, self.error_version, self.error_kind = failure.error, version, failure.kind
        self.attempts = failure.attempts
        self.next_retry = (
            utc_at(time.time() + max(0.0, failure.next_try - time.monotonic()))
            if failure.kind == "transient"
            else None
        )

    def note(self, error: str, version: str | None, kind: FailureKind) -> None:
        """An error that changes nothing served (what is loaded keeps serving)."""
        self.error, self.error_version, self.error_kind = error, version, kind

    def unserved(self) -> None:
        """Nothing of this name is served (it may load again on its next request)."""
        self.live = self.path = self.sha256 = None
