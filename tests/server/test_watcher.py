"""The registry watcher (``server_plugin.watcher``): a hint that wakes the loop early."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import fake_adapter

from agent_finetune.registry import Registry
from server_plugin.watcher import RegistryWatcher


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_watcher_wakes_on_publish_but_not_on_reads(tmp_path: Path, polling: bool) -> None:
    registry, tmp = Registry(tmp_path / "registry"), tmp_path
    registry.root.mkdir()
    woken = threading.Event()
    watcher = RegistryWatcher(registry.root, woken.set, polling=polling, poll_interval_s=0.2)
    assert watcher.start()
    try:
        registry.publish("x", fake_adapter(tmp / "a1", seed=1))
        assert woken.wait(10)
        time.sleep(1.0)  # let the publish's remaining events arrive
        woken.clear()
        for _ in range(3):
            registry.current("x")
            registry.manifest("x", "v0001")
        assert not woken.wait(0.5)
    finally:
        watcher.stop()
    missing = RegistryWatcher(tmp / "nope", woken.set)
    assert not missing.start()


def test_a_failing_wake_never_kills_the_observer(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.root.mkdir()
    calls: list[int] = []

    def wake() -> None:
        calls.append(1)
        raise RuntimeError("the loop is gone")

    watcher = RegistryWatcher(registry.root, wake, polling=True, poll_interval_s=0.1)
    assert watcher.start()
    try:
        for i, wanted in enumerate((1, 2)):
            (registry.root / f"f{i}").write_text("x")
            deadline = time.monotonic() + 10
            while len(calls) < wanted and time.monotonic() < deadline:
                time.sleep(0.05)
        assert watcher.running and len(calls) >= 2  # the second change still woke it
    finally:
        watcher.stop()
    assert not watcher.running


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_captured_traffic_never_wakes_the_loop(tmp_path: Path, polling: bool) -> None:
    from agent_finetune.registry.capture import (
        CaptureSettings,
        SegmentWriter,
        capture_dir,
        write_settings,
    )

    registry = Registry(tmp_path / "registry")
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    write_settings(registry.name_dir("x"), CaptureSettings(enabled=True))
    woken = threading.Event()
    watcher = RegistryWatcher(registry.root, woken.set, polling=polling, poll_interval_s=0.2)
    assert watcher.start()
    try:
        time.sleep(0.5)
        woken.clear()
        writer = SegmentWriter(capture_dir(registry.name_dir("x")), "r1", segment_bytes=4096)
        for i in range(40):  # appends and rotations
            writer.append([{"kind": "exchange", "id": str(i), "answer": "x" * 300}])
        assert not woken.wait(1.0)
        registry.publish("x", fake_adapter(tmp_path / "a2", seed=2))
        assert woken.wait(10)  # the rest of the registry still wakes it
    finally:
        watcher.stop()
