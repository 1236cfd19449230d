"""One name's status (``server_plugin.status``): every state change through one method."""

from __future__ import annotations

import time

from server_plugin.failures import Failure
from server_plugin.status import AdapterStatus


def test_show_then_settle_clears_every_failure_field() -> None:
    st = AdapterStatus("x", desired="v0002", live="v0001")
    st.show(Failure("transient", "EIO", attempts=3, next_try=time.monotonic() + 5), "v0002")
    assert (st.state, st.error, st.error_version, st.error_kind, st.attempts) == (
        "retrying",
        "EIO",
        "v0002",
        "transient",
        3,
    )
    assert st.next_retry is not None and st.next_retry.endswith("+00:00")
    st.show(Failure("permanent", "rank 32 > 16"), "v0002")
    assert st.state == "failed" and st.next_retry is None
    st.settle("live")
    assert st.as_dict() | {"state": "x"} == AdapterStatus(
        "x", desired="v0002", live="v0001"
    ).as_dict() | {"state": "x"}


def test_a_note_changes_nothing_served() -> None:
    st = AdapterStatus("x", desired="v0001", live="v0001", state="live", path="/c/x")
    st.note("versions/: Input/output error", "v0001", "transient")
    assert st.state == "live" and st.live == "v0001" and st.error_kind == "transient"
    st.unserved()
    assert (st.live, st.path, st.sha256) == (None, None, None)
