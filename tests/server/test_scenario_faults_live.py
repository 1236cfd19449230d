"""Issue 10's important faults against the real vLLM CPU server (the session's `live`
server; no restart here). Each failed on the code before the fix."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import write_version
from hotswap_live import RESYNC_S, Live

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def passes(live: Live, n: int) -> None:
    """Wait until ``n`` more passes have run."""
    for _ in range(n):
        last = live.status()["last_sync"]
        live.wait_for(lambda last=last: live.status()["last_sync"] != last, "a pass")


def test_empty_registry_root_unloads_nothing(live: Live) -> None:
    live.registry.publish("steady", live.good[5])
    live.wait_live("steady", "v0001")
    answer = live.ask("steady")
    root = live.registry.root
    away = root.with_name("registry-away")
    root.rename(away)
    root.mkdir()  # an unmounted mountpoint looks like this
    try:
        live.wait_for(lambda: live.status()["registry_available"] is False, "unavailable")
        passes(live, 4)
        assert live.ask("steady") == answer
        assert live.adapter("steady")["live"] == "v0001"  # type: ignore[index]
    finally:
        root.rmdir()
        away.rename(root)
    live.wait_for(lambda: live.status()["registry_available"], "available again")
    assert live.ask("steady") == answer


def test_transient_failure_is_retried_until_it_clears(live: Live) -> None:
    live.registry.publish("flaky", live.good[1])
    live.wait_live("flaky", "v0001")
    # Block the server's copy of the next version: a file where its folder must go.
    cache = Path(live.status()["cache_dir"])
    shutil.rmtree(cache / "flaky")
    (cache / "flaky").write_text("not a folder")  # every copy into flaky/ fails (OSError)
    try:
        live.registry.publish("flaky", live.good[2])

        def retrying() -> dict[str, Any] | None:
            a = live.adapter("flaky")
            return a if a and a["state"] == "retrying" and a["attempts"] >= 2 else None

        st = live.wait_for(retrying, "flaky to retry")
        assert st["live"] == "v0001" and st["error_kind"] == "transient" and st["next_retry"]
    finally:
        (cache / "flaky").unlink()
    live.wait_live("flaky", "v0002", timeout=RESYNC_S + 10)  # retry cap is 1 s here
    assert live.ask("flaky") == live.ask("flaky@v0002")


def test_reused_version_number_serves_its_new_weights(live: Live) -> None:
    live.registry.publish("reuse", live.good[3])
    live.wait_live("reuse", "v0001")
    before = live.ask("reuse")
    shutil.rmtree(live.registry.version_dir("reuse", "v0001"))
    write_version(live.registry, "reuse", live.good[4])  # v0001 again, other weights

    def reloaded() -> bool:
        a = live.adapter("reuse")
        return bool(
            a and a["state"] == "live" and a["sha256"] and a["path"] and "v0001" in a["path"]
        )

    live.wait_for(lambda: reloaded() and live.ask("reuse") != before, "the new v0001")
    assert live.ask("reuse") == live.ask("reuse@v0001")
