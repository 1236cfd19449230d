"""The sidecar refuses servers where a swap over HTTP would serve stale prefix-cache KV
(found on GPU vLLM 0.26: the reloaded name answered from the old version's cached prompt)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from helpers import fake_adapter
from hypothesis import given
from hypothesis import strategies as st

from agent_finetune.registry import Registry
from server_plugin.compat import PREFIX_CACHE_KEYS_LORA_PATH, stale_prefix_cache_error
from server_plugin.sidecar import SyncOptions, server_facts, sync


def cache_info(prefix_caching: str) -> str:
    return (
        "# TYPE vllm:cache_config_info gauge\n"
        f'vllm:cache_config_info{{block_size="16",enable_prefix_caching="{prefix_caching}",'
        'engine="0",gpu_memory_utilization="0.9"} 1.0\n'
    )


def fake_vllm(version: str | None, metrics: str, posts: list[str]) -> httpx.MockTransport:
    """A vLLM API server's read routes; records every POST (a load or unload)."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST":
            posts.append(path)
            return httpx.Response(200, json={})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base", "root": "base"}]})
        if path == "/version" and version is not None:
            return httpx.Response(200, json={"version": version})
        if path == "/metrics":
            return httpx.Response(200, text=metrics)
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handle)


@given(
    major=st.just(0),
    minor=st.integers(0, 40),
    patch=st.integers(0, 3),
    flag=st.sampled_from([True, False, None]),
)
def test_only_name_keyed_lines_with_prefix_caching_are_refused(
    major: int, minor: int, patch: int, flag: bool | None
) -> None:
    error = stale_prefix_cache_error(f"{major}.{minor}.{patch}", flag)
    name_keyed = (major, minor) < PREFIX_CACHE_KEYS_LORA_PATH
    assert (error is not None) == (name_keyed and flag is not False)
    if error:
        assert "--no-enable-prefix-caching" in error and "0.31" in error


@pytest.mark.parametrize(
    ("version", "metrics", "facts"),
    [
        ("0.26.0", cache_info("True"), ("0.26.0", True)),
        ("0.30.0+cpu", cache_info("False"), ("0.30.0+cpu", False)),
        (None, "", (None, None)),  # a server that says neither
    ],
)
def test_server_facts_reads_version_and_prefix_caching(
    version: str | None, metrics: str, facts: tuple[str | None, bool | None]
) -> None:
    async def read() -> tuple[str | None, bool | None]:
        transport = fake_vllm(version, metrics, [])
        async with httpx.AsyncClient(base_url="http://vllm", transport=transport) as client:
            return await server_facts(client)

    assert asyncio.run(read()) == facts


@pytest.mark.parametrize("version", ["0.26.0", "0.30.0"])
def test_sync_refuses_a_name_keyed_prefix_cache_before_loading_anything(
    tmp_path: Path, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish("side", fake_adapter(tmp_path / "a", base_model="base"))
    posts: list[str] = []
    options = SyncOptions(
        server="http://vllm",
        registry=registry.root,
        cache_dir=tmp_path / "cache",
        once=True,
        strict_base=False,
    )
    code = asyncio.run(sync(options, fake_vllm(version, cache_info("True"), posts)))
    assert code == 2
    assert posts == []  # no load, no unload
    err = capsys.readouterr().err
    assert f"vLLM {version} keys its prefix cache by LoRA name alone" in err
    assert "--no-enable-prefix-caching" in err
