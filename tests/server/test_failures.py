"""The one failure memory (``server_plugin.failures``): kinds, backoff, refusal texts."""

from __future__ import annotations

import errno
import random
import time

import pytest

from agent_finetune.errors import LoadError, ServerUnavailableError, ValidationError
from server_plugin.failures import Failures, describe, failure_kind


def test_backoff_is_capped_exponential_with_jitter() -> None:
    failures = Failures(retry_base_s=1.0, retry_max_s=8.0, rng=random.Random(0))
    delays = []
    for _ in range(7):
        before = time.monotonic()
        failure = failures.record(("x", "v0001", "k"), OSError("eio"))
        delays.append(failure.next_try - before)
    caps = [1, 2, 4, 8, 8, 8, 8]
    assert all(c / 2 - 0.01 <= d <= c + 0.01 for d, c in zip(delays, caps, strict=True)), delays
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jitter: capped delays differ
    assert failures.get(("x", "v0001", "k")).attempts == 7  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.EIO, "Input/output error"), "transient"),
        (ServerUnavailableError("HTTP 503"), "transient"),
        (TimeoutError("slow"), "transient"),
        (ValidationError("bad", ["rank 32 > 16"]), "permanent"),
        (LoadError("HTTP 400"), "permanent"),
        (KeyError("a bug"), "transient"),
    ],
)
def test_failures_have_kinds(exc: BaseException, kind: str) -> None:
    assert failure_kind(exc) == kind


def test_names_and_pins_share_one_memory_and_one_refusal_text() -> None:
    """Before the split a name's failure and a pin's failure of the same content were two
    memories with their own texts; a request for either now reads the same failure."""
    failures = Failures(retry_base_s=30, retry_max_s=60)
    failures.record(("x", "v0002", "k"), ValidationError("bad", ["rank 32 > 16", "DoRA"]))
    blocked = failures.blocking(("x", "v0002", "k"))
    assert blocked is not None and blocked.error == "rank 32 > 16; DoRA"
    assert blocked.refusal("x@v0002").message == "x@v0002 cannot be served: rank 32 > 16; DoRA"
    assert blocked.refusal("x").status == 400
    failures.record(("y", "v0001", "k"), OSError(errno.ENOSPC, "No space left on device"))
    later = failures.blocking(("y", "v0001", "k"))
    assert later is not None and later.refusal("y").status == 503
    assert "retry later" in later.refusal("y").message
    assert failures.of_version("x", "v0002") is blocked
    assert failures.errors() == {"x@v0002": blocked.error, "y@v0001": later.error}
    failures.forget("x")
    assert failures.get(("x", "v0002", "k")) is None and failures.next_due() is not None


def test_a_due_transient_failure_no_longer_blocks() -> None:
    failures = Failures(retry_base_s=0.01, retry_max_s=0.01)
    failures.record(("x", "v0001", None), OSError("eio"))
    time.sleep(0.02)
    assert failures.blocking(("x", "v0001", None)) is None
    assert failures.get(("x", "v0001", None)) is not None  # remembered: attempts add up


def test_describe_names_every_validation_problem() -> None:
    assert describe(ValidationError("x", ["a", "b"])) == "a; b"
    assert describe(KeyError()) == "KeyError: "
    assert describe(OSError("disk gone")) == "disk gone"
