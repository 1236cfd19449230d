"""What agent clients and frameworks meet on a plugin server (the session's live server).

The openai SDK tests run everywhere. LangChain, LiteLLM and the OpenAI Agents SDK are not
dependencies: their tests run when they are importable and send the same HTTP shapes
(README: "Use it from your agent framework").
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from hotswap_live import API_KEY, Live

pytestmark = pytest.mark.slow
NAME = "clients-bot"
HEADER = "x-adapter-version"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(live: Live) -> Live:
    """``clients-bot``: v0001 current; v0002 and v0003 published, never requested (v0003,
    the newest, is staged where the server has room)."""
    if not live.registry.versions(NAME):
        live.registry.publish(NAME, live.good[5])
        live.registry.publish(NAME, live.good[6], make_current=False)
        live.registry.publish(NAME, live.good[7], make_current=False)
    live.wait_servable(NAME, "v0001")
    return live


def test_answering_version_header_plain_and_streaming(served: Live) -> None:
    client = served.client()
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=MESSAGES, max_tokens=4
    )
    assert raw.headers[HEADER] == raw.parse().model == f"{NAME}@v0001"
    with client.chat.completions.with_streaming_response.create(
        model=NAME, messages=MESSAGES, max_tokens=4, stream=True
    ) as stream:
        assert stream.headers[HEADER] == f"{NAME}@v0001"
        models = {chunk.model for chunk in stream.parse()}
    assert models == {f"{NAME}@v0001"}
    raw = client.completions.with_raw_response.create(
        model=f"{NAME}@v0002", prompt="hi", max_tokens=2
    )
    assert raw.headers[HEADER] == f"{NAME}@v0002"


def test_models_listing_links_names_and_versions(served: Live) -> None:
    client = served.client()

    def staging_done() -> dict[str, Any] | None:  # staged, or nothing to stage here
        a, room = served.adapter(NAME), served.status()["max_staged"]
        staged = a is not None and any(e["state"] == "staged" for e in a["staged"])
        return a if a is not None and (staged or room == 0 or a["state"] == "lazy") else None

    served.wait_for(staging_done, f"{NAME}'s next version to be staged")
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards[NAME]["version"] == f"{NAME}@v0001"
    assert cards[f"{NAME}@v0001"]["aliases"] == [NAME] and cards[f"{NAME}@v0001"]["loaded"]
    # Published, never requested: listed (it can be pinned); loaded when staged (the newest
    # version above current is, on a server with room for it).
    staged = {e["version"] for e in served.adapter(NAME)["staged"] if e["state"] == "staged"}
    assert cards[f"{NAME}@v0003"]["loaded"] is ("v0003" in staged)
    assert f"{NAME}@v0002" in cards  # listed whether loaded (staged once, then standby) or not
    assert client.models.retrieve(NAME).model_dump()["version"] == f"{NAME}@v0001"
    assert client.models.retrieve(f"{NAME}@v0003").id == f"{NAME}@v0003"
    with pytest.raises(openai.NotFoundError, match="v0001, v0002, v0003"):
        client.models.retrieve(f"{NAME}@v0009")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (f"{NAME}@v0009", "has versions v0001, v0002, v0003 (current: v0001)"),
        ("nobody@v0001", NAME),
    ],
)
def test_unknown_model_404_says_what_exists(served: Live, model: str, expected: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        served.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert expected in str(e.value)


def test_tools_are_accepted_plain_and_streaming(served: Live) -> None:
    """With `serve --tool-call-parser`, `tools` is not a 400 (it was without it)."""
    client = served.client()
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=8
    )
    assert raw.http_response.status_code == 200 and raw.headers[HEADER] == f"{NAME}@v0001"
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=MESSAGES, tools=[WEATHER_TOOL], max_tokens=8, stream=True
        )
    )
    assert chunks and all(c.model == f"{NAME}@v0001" for c in chunks)


def test_async_and_batch_shapes(served: Live) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=served.handle.base_url, api_key=API_KEY)
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=2)
                for m in (NAME, f"{NAME}@v0002", NAME)
            )
        )
        return [r.model for r in replies]

    assert asyncio.run(main()) == [f"{NAME}@v0001", f"{NAME}@v0002", f"{NAME}@v0001"]


# -- frameworks, when installed ------------------------------------------------------------
def test_langchain_chat_openai(served: Live) -> None:
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(
        model=NAME,
        base_url=served.handle.base_url,
        api_key=API_KEY,
        max_tokens=4,
        temperature=0,
        include_response_headers=True,
    )
    msg = llm.invoke("hi")
    assert msg.response_metadata["model_name"] == f"{NAME}@v0001"
    assert msg.response_metadata["headers"][HEADER] == f"{NAME}@v0001"
    chunks = list(llm.stream("hi"))
    assert chunks[0].response_metadata["headers"][HEADER] == f"{NAME}@v0001"
    tool_msg = llm.bind_tools([WEATHER_TOOL]).invoke("weather in Paris?")  # not a 400
    assert tool_msg.response_metadata["model_name"] == f"{NAME}@v0001"


def test_litellm_prefixes_and_header(served: Live) -> None:
    litellm = pytest.importorskip("litellm")
    for prefix in ("openai/", "hosted_vllm/"):
        resp = litellm.completion(
            model=prefix + NAME,
            api_base=served.handle.base_url,
            api_key=API_KEY,
            messages=MESSAGES,
            max_tokens=4,
        )
        headers = resp._hidden_params["additional_headers"]
        assert headers[f"llm_provider-{HEADER}"] == f"{NAME}@v0001"
    stream = litellm.completion(
        model="openai/" + NAME,
        api_base=served.handle.base_url,
        api_key=API_KEY,
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        tools=[WEATHER_TOOL],
    )
    assert list(stream)
    headers = stream._hidden_params["additional_headers"]
    assert headers[f"llm_provider-{HEADER}"] == f"{NAME}@v0001"


def test_openai_agents_sdk_with_a_function_tool(served: Live) -> None:
    agents = pytest.importorskip("agents")

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=served.handle.base_url, api_key=API_KEY)
    agent = agents.Agent(
        name="support",
        instructions="Answer briefly.",
        model=agents.OpenAIChatCompletionsModel(model=NAME, openai_client=client),
        model_settings=agents.ModelSettings(max_tokens=8),
        tools=[get_weather],
    )
    result = agents.Runner.run_sync(
        agent, "weather in Paris?", run_config=agents.RunConfig(tracing_disabled=True)
    )
    assert result.raw_responses and isinstance(result.final_output, str)
