"""`agent-finetune canary status --server`: the registry's canary plus a server's counters.

(The registry side of the canary commands: test_rollout_scenario.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run
from fake_plugin_server import FakePluginServer, serving
from helpers import registry_with_versions

COUNTERS = {
    "version": "v0002",
    "verdict": "green",
    "replicas": 2,
    "versions": {
        "v0001": {"role": "baseline", "requests": 90, "errors": 0, "p50_token_s": 0.025},
        "v0002": {"role": "canary", "requests": 10, "errors": 1, "negative_rate": 0.5},
    },
}


def test_status_shows_the_servers_live_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_with_versions(tmp_path, "bot", 2)
    where = ("--registry", str(reg.root))
    assert run(capsys, "canary", "start", "bot@v0002", "--weight", "10", *where)[0] == 0
    adapters = {"data": [], "canary": {"names": {"bot": COUNTERS}}}
    with serving(FakePluginServer(adapters=adapters)) as fake:
        monkeypatch.setenv("AGENT_FINETUNE_SERVER", fake.url + "/v1")  # the default --server
        code, out, err = run(capsys, "canary", "status", "bot", *where)
        assert code == 0, err
        assert "counted over 2 server(s); verdict: green" in out and "25.00" in out
        code, out, _ = run(capsys, "canary", "status", "bot", *where, "--json")
    assert json.loads(out)["server"] == COUNTERS
    assert [s.path for s in fake.seen] == ["/v1/adapters", "/v1/adapters"]


def test_a_server_without_the_plugin_is_named_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_with_versions(tmp_path, "bot", 2)
    with serving(FakePluginServer(adapters={"object": "list"})) as fake:
        code, _, err = run(
            capsys, "canary", "status", "bot", "--server", fake.url, "--registry", str(reg.root)
        )
    assert code == 1 and f"{fake.url}/v1/adapters" in err and "agent-finetune serve" in err
