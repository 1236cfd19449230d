"""``agent_finetune.server_client``: the URL rule, the API key rule, /v1/adapters, the errors.

Requests go through an httpx ``MockTransport`` (no sockets) unless a test needs a refused
connection.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_finetune.errors import (
    AgentFinetuneError,
    ConfigError,
    ServerResponseError,
    ServerUnavailableError,
)
from agent_finetune.server_client import (
    API_KEY_VARIABLES,
    ENV_SERVER,
    ServerClient,
    add_server_options,
    resolve_api_key,
)

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, server: str = "http://h:8000", **kw: Any) -> ServerClient:
    return ServerClient(server, transport=httpx.MockTransport(handler), **kw)


def adapters_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"data": [], "path": request.url.path})


@pytest.mark.parametrize(
    "server", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", " http://h:8000/v1/ "]
)
def test_with_or_without_v1_is_one_server(server: str) -> None:
    c = client(adapters_answer, server)
    assert (c.root, c.base_url) == ("http://h:8000", "http://h:8000/v1")
    assert c.adapters()["path"] == "/v1/adapters"


def test_a_server_behind_a_path_prefix_keeps_it() -> None:
    assert client(adapters_answer, "https://gw/team/llm/v1").adapters()["path"] == (
        "/team/llm/v1/adapters"
    )


@pytest.mark.parametrize("server", ["localhost:8000", "127.0.0.1:8000/v1", "ftp://h", "http://"])
def test_a_url_without_http_is_a_config_error_with_an_example(server: str) -> None:
    with pytest.raises(ConfigError, match=r"such as http://127\.0\.0\.1:8000"):
        ServerClient(server)


@given(
    given_key=st.sampled_from([None, "", "flag"]),
    env=st.fixed_dictionaries(
        {}, optional={v: st.sampled_from(["", v]) for v in API_KEY_VARIABLES}
    ),
)
def test_the_api_key_rule(given_key: str | None, env: dict[str, str]) -> None:
    """--api-key, else $VLLM_API_KEY, else $OPENAI_API_KEY; an empty value counts as unset."""
    expected = given_key or env.get("VLLM_API_KEY") or env.get("OPENAI_API_KEY") or None
    assert resolve_api_key(given_key, env) == expected


def test_the_key_goes_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return adapters_answer(request)

    client(handler).adapters()
    client(handler, api_key="flag").post_json("/v1/x", {})
    monkeypatch.delenv("OPENAI_API_KEY")
    client(handler).get_json("/v1/x")
    assert seen == ["Bearer from-openai-env", "Bearer flag", None]


def test_a_refused_connection_names_the_url_and_how_to_start_a_server() -> None:
    with pytest.raises(ServerUnavailableError) as e:
        ServerClient("http://127.0.0.1:9/v1", timeout=5).adapters()
    message = str(e.value)
    assert message.startswith("cannot reach http://127.0.0.1:9/v1/adapters:")
    assert "agent-finetune serve" in message and ENV_SERVER in message
    assert isinstance(e.value, OSError)  # caught wherever I/O errors are


def test_a_timeout_says_so() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(
        ServerUnavailableError, match=r"http://h:8000/v1/adapters: no answer within 3s"
    ):
        client(handler, timeout=3).adapters()


@pytest.mark.parametrize(
    ("status", "body", "error", "fragments"),
    [
        (401, {"error": "Unauthorized"}, ServerResponseError, ["refused", "--api-key"]),
        (403, {}, ServerResponseError, ["HTTP 403", "VLLM_API_KEY"]),
        (404, {"detail": "Not Found"}, ServerResponseError, ["Not Found", "agent-finetune serve"]),
        (500, {"error": {"message": "engine dead"}}, ServerUnavailableError, ["engine dead"]),
        (503, "overloaded", ServerUnavailableError, ["HTTP 503", "overloaded"]),
        (200, "<html>proxy login</html>", ServerResponseError, ["not a JSON object", "proxy"]),
        (200, [1, 2], ServerResponseError, ["not a JSON object"]),
        (200, {"object": "list"}, ServerResponseError, ["`data` list", "plugin"]),
    ],
)
def test_every_unexpected_answer_is_an_error_naming_the_url(
    status: int, body: Any, error: type[Exception], fragments: list[str]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    with pytest.raises(error) as e:
        client(handler).adapters()
    assert "http://h:8000/v1/adapters" in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)
    if isinstance(e.value, ServerResponseError):
        assert e.value.status == status


@given(status=st.integers(100, 599), body=st.binary(max_size=200))
def test_any_answer_is_a_dict_or_an_agent_finetune_error(status: int, body: bytes) -> None:
    """Whatever a server (or a proxy in front of it) sends, no other exception escapes."""
    c = client(lambda request: httpx.Response(status, content=body))
    try:
        assert isinstance(c.get_json("/v1/models"), dict)
    except AgentFinetuneError as e:
        assert "http://h:8000/v1/models" in str(e)


def test_stream_yields_events_until_done_and_raises_a_mid_stream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        lines = ['data: {"n": 1}', "data:", ": keep-alive", 'data: {"n": 2}', "data: [DONE]"]
        lines += ['data: {"n": 3}']
        if request.url.path.endswith("broken"):
            lines = ['data: {"n": 1}', 'data: {"error": {"message": "engine died"}}']
        return httpx.Response(200, text="\n\n".join(lines))

    assert list(client(handler).stream_json("/v1/chat/completions", {})) == [{"n": 1}, {"n": 2}]
    stream = client(handler).stream_json("/v1/broken", {})
    assert next(stream) == {"n": 1}
    with pytest.raises(ServerResponseError, match="failed mid-answer: engine died"):
        next(stream)


def test_a_refused_stream_raises_before_any_event() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "The model `x` does not exist."}})

    with pytest.raises(ServerResponseError, match="does not exist") as e:
        list(client(handler).stream_json("/v1/chat/completions", {}))
    assert e.value.status == 404


def parse(monkeypatch: pytest.MonkeyPatch, env: str | None, *argv: str, **kw: Any) -> Any:
    if env is None:
        monkeypatch.delenv(ENV_SERVER, raising=False)
    else:
        monkeypatch.setenv(ENV_SERVER, env)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_server_options(parser, purpose="the server", **kw)
    return parser.parse_args(argv)


def test_server_option_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(monkeypatch, None).server is None
    assert parse(monkeypatch, None, fallback="http://x").server == "http://x"
    assert parse(monkeypatch, "http://env", fallback="http://x").server == "http://env"
    assert parse(monkeypatch, "http://env", "--server", "http://a").server == "http://a"
    assert parse(monkeypatch, "http://env").api_key is None  # resolved by the client


def test_replicas_replace_the_default_and_are_required_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse(monkeypatch, "http://env", replicas=True).server == ["http://env"]
    args = parse(monkeypatch, "http://env", "--server", "http://a", "--server", "b", replicas=True)
    assert args.server == ["http://a", "b"]
    with pytest.raises(SystemExit):
        parse(monkeypatch, None, replicas=True)
