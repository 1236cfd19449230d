"""What every model answer carries (``server_plugin.answers``): the version that answered in
a header, and a 404 that says what exists, from the catalog (no registry scan)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import fake_adapter

from agent_finetune.registry import Registry
from agent_finetune.registry.index import pointers
from server_plugin.answers import HEADER, AnswerHeaders, missing_model_message
from server_plugin.catalog import Catalog


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    registry = Registry(tmp_path / "registry")
    registry.publish("bot", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("bot", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    for i in range(25):
        (registry.root / f"n{i:02d}" / "versions").mkdir(parents=True)
    catalog = Catalog(registry)
    catalog.update(pointers(registry))

    def no_scan(*args: Any) -> Any:
        raise AssertionError("a request scanned the registry root")

    monkeypatch.setattr(registry, "names", no_scan)
    monkeypatch.setattr(registry, "scan", no_scan)
    return catalog


def test_an_unknown_model_is_told_what_exists_without_a_registry_scan(catalog: Catalog) -> None:
    """Finding (issue 25): every unknown-model 404 scanned the registry (170 ms at 10,000
    names), for client input."""
    text = missing_model_message(catalog, "bot@v0009")
    assert text is not None
    assert "Adapter 'bot' has versions v0001, v0002 (current: v0001)" in text
    text = missing_model_message(catalog, "nobody")
    assert text is not None and "Adapters in the registry: bot, n00," in text
    assert "and 6 more" in text  # 26 names, 20 shown
    assert "Adapters in the registry" in (missing_model_message(catalog, "Bad Name!") or "")


def answer(app: Any, status: int, body: bytes) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def downstream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def send(message: Any) -> None:
        sent.append(message)

    async def describe(model: str) -> str | None:
        return f"no {model}; try bot"

    middleware = AnswerHeaders(downstream, frozenset({"/v1/chat/completions"}), describe)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    asyncio.run(middleware(scope, None, send))  # type: ignore[arg-type]
    return sent


def test_the_answering_version_is_a_header_and_unknown_models_get_a_hint() -> None:
    start, _ = answer(None, 200, b'{"id":"c1","model":"bot@v0002","choices":[]}')
    assert (HEADER.encode(), b"bot@v0002") in start["headers"]
    missing = json.dumps({"error": {"message": "The model `ghost` does not exist."}}).encode()
    start, body = answer(None, 404, missing)
    assert json.loads(body["body"])["error"]["message"] == "no ghost; try bot"
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]
