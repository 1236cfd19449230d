"""`agent-finetune ask`: one chat call, streamed or not, and one clear line when it fails."""

from __future__ import annotations

import io

import pytest
from cli_helpers import cli, run
from fake_plugin_server import FakePluginServer, serving

from agent_finetune.cli.ask import ask
from agent_finetune.errors import AskError


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VLLM_API_KEY", "OPENAI_API_KEY", "AGENT_FINETUNE_SERVER"):
        monkeypatch.delenv(name, raising=False)


def test_streamed_and_whole_replies_are_the_same_text() -> None:
    with serving(FakePluginServer()) as fake:
        out = io.StringIO()
        streamed = ask("bot", "hi", server=fake.url + "/v1", stream=True, out=out)
        whole = ask("bot", "hi", server=fake.url, version="v0002")
    assert streamed.strip() == "bot says hello there" == out.getvalue().strip()
    assert whole == "bot@v0002 says hello there"
    sent = [s.path for s in fake.seen]
    assert sent == ["/v1/chat/completions", "/v1/chat/completions"]


def test_the_command_prints_the_reply(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakePluginServer()) as fake:
        assert run(capsys, "ask", "bot", "hi", "--server", fake.url) == (
            0,
            "bot says hello there \n",
            "",
        )
        code, out, _ = run(capsys, "ask", "bot", "hi", "--server", fake.url, "--no-stream")
    assert (code, out) == (0, "bot says hello there\n")


@pytest.mark.parametrize("stream", [True, False])
def test_an_unknown_name_lists_what_the_server_serves(stream: bool) -> None:
    with serving(FakePluginServer(models=["base", "bot"])) as fake, pytest.raises(AskError) as e:
        ask("nobody", "hi", server=fake.url, stream=stream)
    assert str(e.value) == f"{fake.url} does not serve 'nobody'; it serves: base, bot"


def test_a_server_that_is_down_is_one_line_with_the_fix() -> None:
    for url in ("http://127.0.0.1:9", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/"):
        proc = cli("ask", "bot", "hi", "--server", url)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "cannot reach http://127.0.0.1:9/v1/chat/completions:" in proc.stderr
        assert "agent-finetune serve" in proc.stderr
