"""`agent-finetune eval`: the target grammar, and scoring through a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run
from fake_plugin_server import FakePluginServer, serving
from helpers import registry_with_versions

from agent_finetune.cli.eval import parse_target
from agent_finetune.errors import EvalError
from agent_finetune.registry.eval_records import read_evals


def test_parse_target() -> None:
    assert parse_target("bot@v0002") == ("bot", "v0002")
    assert parse_target("bot") == ("bot", None)
    assert parse_target("bot", "v0003") == ("bot", "v0003")
    assert parse_target("bot@v0003", "v0003") == ("bot", "v0003")
    with pytest.raises(EvalError, match="disagree"):
        parse_target("bot@v0002", "v0003")
    with pytest.raises(EvalError, match="NAME@vNNNN"):
        parse_target("bot@2")


def test_eval_through_a_server_pairs_candidate_and_live_and_records_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_with_versions(tmp_path, "bot", 2)
    data = tmp_path / "heldout.json"
    rows = [{"instruction": f"q{i}?", "response": f"bot@v0002 says {i}"} for i in range(4)]
    data.write_text(json.dumps(rows), encoding="utf-8")
    with serving(FakePluginServer()) as fake:
        argv = ["eval", "bot@v0002", "--data", str(data), "--server", fake.url + "/v1"]
        code, out, err = run(capsys, *argv, "--registry", str(reg.root), "--json")
        assert code == 0, err
        result = json.loads(out)
        code, table, _ = run(capsys, *argv, "--registry", str(reg.root))
    assert (result["candidate"], result["live"], result["rows"]) == ("v0002", "v0001", 4)
    # The fake scores every token of v0002 at -1/3 and v0001 at -1/2: a gain on every row.
    loglik = result["comparison"]["loglik"]
    assert loglik["wins"] == 4 and loglik["delta"] == pytest.approx(1 / 2 - 1 / 3)
    assert "WIN RATE" in table and "100% (4/0/0)" in table
    models = {s.path for s in fake.seen}
    assert models == {"/v1/chat/completions", "/tokenize", "/v1/completions"}
    assert [e["version"] for e in read_evals(reg, "bot")][:2] == ["v0002", "v0001"]
