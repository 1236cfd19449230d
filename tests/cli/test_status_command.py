"""`agent-finetune status`: replicas are real reconcilers (fake transport) behind real HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import FAKE_BASE_CONFIG, fake_adapter

from agent_finetune.cli import main
from agent_finetune.cli.status import fetch_adapters, watch
from agent_finetune.registry import Registry
from server_plugin.cache import AdapterCache, Limits
from server_plugin.launch import free_port
from server_plugin.reconciler import Reconciler

LIMITS = Limits(max_rank=16, base_model="fake-base", base_config=FAKE_BASE_CONFIG)


class DictTransport:
    """Serves a dict of name -> path, like vLLM's lora_requests."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}

    async def served(self) -> dict[str, str]:
        return dict(self.table)

    async def load(self, served_name: str, path: str) -> None:
        self.table[served_name] = path

    async def repoint(self, name: str, target: str) -> None:
        self.table[name] = self.table[target]

    async def unload(self, served_name: str) -> None:
        self.table.pop(served_name, None)


class Replica:
    """A reconciler on the shared registry, its status on ``GET /v1/adapters``."""

    def __init__(self, registry: Registry, cache: Path) -> None:
        self.reconciler = Reconciler(
            registry, AdapterCache(cache, LIMITS, grace_s=0), DictTransport()
        )
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/v1/adapters":
                    self.send_error(404)
                    return
                body = json.dumps(replica.reconciler.status()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def sync(self) -> None:
        asyncio.run(self.reconciler.reconcile_once())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Registry, list[Replica], Path]]:
    registry = Registry(tmp_path / "registry")
    registry.root.mkdir()
    replicas = [Replica(registry, tmp_path / f"cache{i}") for i in range(2)]
    yield registry, replicas, tmp_path
    for r in replicas:
        r.http.shutdown()
        r.http.server_close()


def status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["status", *argv])
    return code, capsys.readouterr().out


def test_agreeing_replicas_exit_0(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    registry, replicas, tmp = fleet
    registry.publish("a", fake_adapter(tmp / "a1", seed=1))
    registry.publish("b", fake_adapter(tmp / "b1", seed=2))
    for r in replicas:
        r.sync()
    args = [x for r in replicas for x in ("--server", r.url)]
    code, out = status(capsys, *args)
    assert code == 0, out
    assert "in agreement" in out and "NOT" not in out
    assert out.count("v0001") >= 4  # desired and live of two names on two replicas
    code, out = status(capsys, *args, "--json")
    data = json.loads(out)
    assert data["agree"] is True
    assert {(r["name"], r["server"], r["serves"]) for r in data["rows"]} == {
        (n, r.url, "v0001") for n in "ab" for r in replicas
    }


def test_a_lagging_replica_exits_1_naming_it(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, (fast, slow), tmp = fleet
    registry.publish("a", fake_adapter(tmp / "a1", seed=1))
    fast.sync()
    slow.sync()
    registry.publish("a", fake_adapter(tmp / "a2", seed=2))
    fast.sync()  # the slow replica never sees the pointer move
    code, out = status(capsys, "--server", fast.url, "--server", slow.url, "--max-lag", "0.2")
    assert code == 1
    assert f"problem: {slow.url}: a serves v0001, not v0002" in out
    assert "NOT in agreement" in out
    slow.sync()
    code, out = status(capsys, "--server", fast.url, "--server", slow.url, "--max-lag", "0.2")
    assert code == 0, out


def test_a_disagreement_that_resolves_within_max_lag_is_fine(fleet: Any) -> None:
    registry, (fast, slow), tmp = fleet
    registry.publish("a", fake_adapter(tmp / "a1", seed=1))
    fast.sync()
    slow.sync()
    registry.publish("a", fake_adapter(tmp / "a2", seed=2))
    fast.sync()
    polls: list[float] = []

    def converge(seconds: float) -> None:  # the slow replica's next pass, between two polls
        polls.append(seconds)
        slow.sync()

    rows, problems, agree = watch(
        [fast.url, slow.url], fetch_adapters(None), max_lag_s=3600, sleep=converge
    )
    assert agree and not problems and len(polls) == 1
    assert {r.serves for r in rows} == {"v0002"}


def test_an_unreachable_server_exits_1(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    registry, (replica, _), tmp = fleet
    registry.publish("a", fake_adapter(tmp / "a1", seed=1))
    replica.sync()
    down = f"http://127.0.0.1:{free_port()}"
    code, out = status(capsys, "--server", replica.url, "--server", down)
    assert code == 1
    assert f"problem: cannot reach {down}/v1/adapters: " in out
    assert "agent-finetune serve" in out


def test_servers_given_with_v1_are_read_at_v1_adapters(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --server http://h:8000/v1` asked /v1/v1/adapters (issue 20)."""
    registry, replicas, tmp = fleet
    registry.publish("a", fake_adapter(tmp / "a1", seed=1))
    for r in replicas:
        r.sync()
    code, out = status(capsys, "--server", replicas[0].url + "/v1", "--server", replicas[1].url)
    assert code == 0, out
    assert f"{replicas[0].url} " in out and "/v1 " not in out  # shown as the server's root


def test_status_shows_the_versions_each_replica_staged(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Which versions are staged (loaded ahead: promote and rollback are a repoint) shows
    per replica, and only once the replica really loaded them."""
    registry, (one, two), tmp = fleet
    registry.publish("a", fake_adapter(tmp / "a1", seed=1))
    registry.publish("a", fake_adapter(tmp / "a2", seed=2), make_current=False)
    one.sync()
    two.sync()
    two.reconciler.served.transport.table.pop("a@v0002")  # type: ignore[attr-defined]
    asyncio.run(two.reconciler.served.read_actual())
    two.reconciler._report(None)
    _, out = status(capsys, "--server", one.url, "--server", two.url, "--json")
    rows = {r["server"]: r for r in json.loads(out)["rows"]}
    assert [e["version"] for e in rows[one.url]["staged"]] == ["v0002"]
    assert rows[one.url]["staged"][0]["why"] == "next"
    assert rows[two.url]["staged"] == []  # lost by the server: not shown as staged
    _, out = status(capsys, "--server", one.url, "--server", two.url)
    assert "STAGED" in out and "v0002 (next)" in out
