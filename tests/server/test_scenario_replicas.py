"""Two real vLLM servers with the plugin on one registry: the session's server (preloads
every name) and a lazy one (AGENT_FINETUNE_PRELOAD=none). They converge on every promote,
and `agent-finetune status` says so."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hotswap_live import API_KEY, Live

from agent_finetune.cli import main
from server_plugin.launch import ServerHandle

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NAME = "fleet"


@pytest.fixture(scope="module")
def lazy_replica(live: Live) -> Iterator[ServerHandle]:
    server = live.start_replica("replica", {"AGENT_FINETUNE_PRELOAD": "none"})
    try:
        server.wait_ready(600)
        yield server
    finally:
        server.stop()


def status(capsys: pytest.CaptureFixture[str], *servers: ServerHandle) -> tuple[int, Any]:
    argv = ["status", "--json", "--api-key", API_KEY, "--name", NAME, "--max-lag", "30"]
    code = main([*argv, *[x for s in servers for x in ("--server", s.url)]])
    return code, json.loads(capsys.readouterr().out)


def answer(server: ServerHandle, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=0
    )
    return str(r.model)


def test_two_replicas_converge_and_a_lazy_name_loads_on_first_request(
    live: Live, lazy_replica: ServerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    live.registry.publish(NAME, live.good[0])
    live.wait_servable(NAME, "v0001")  # the session server may keep it lazy too
    # Not loaded, but listed and known: the lazy replica serves it on demand.
    live.wait_for(
        lambda: (
            next(
                (a for a in lazy_replica.get_json("/v1/adapters")["data"] if a["name"] == NAME),
                {},
            ).get("state")
            == "lazy"
        ),
        "the lazy replica to see the name",
    )
    assert lazy_replica.get_json("/v1/adapters")["preload"]["policy"] == "none"
    assert NAME in {m["id"] for m in lazy_replica.get_json("/v1/models")["data"]}
    code, report = status(capsys, live.handle, lazy_replica)
    assert code == 0, report
    assert answer(lazy_replica, NAME) == f"{NAME}@v0001"  # first request loads it

    live.registry.publish(NAME, live.good[1])  # both replicas follow
    live.wait_servable(NAME, "v0002")
    code, report = status(capsys, live.handle, lazy_replica)
    assert code == 0, report
    assert {(r["server"], r["live"]) for r in report["rows"]} == {
        (live.handle.url, "v0002"),
        (lazy_replica.url, "v0002"),
    }
    assert answer(lazy_replica, NAME) == answer(live.handle, NAME) == f"{NAME}@v0002"
