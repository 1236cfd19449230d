"""The registry commands (`agent_finetune.cli.registry_commands`): publish, list, show,
history, promote, rollback, validate, gc, fsck."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import cli, run
from helpers import registry_with_versions

from agent_finetune.registry import Registry
from agent_finetune.training.numpy_adapter import TINY_CONFIG, write_adapter

ROOT = Path(__file__).resolve().parents[2]


def test_publish_list_show_history_promote_rollback_gc(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = write_adapter(tmp_path / "a")
    for _ in range(3):
        assert run(capsys, "publish", "bot", str(adapter))[0] == 0
    code, out, _ = run(capsys, "list")
    assert code == 0 and "bot" in out and "v0003" in out and "NAME" in out
    code, out, _ = run(capsys, "list", "--json")
    rows = json.loads(out)
    assert [(r["version"], r["current"]) for r in rows] == [
        ("v0001", False),
        ("v0002", False),
        ("v0003", True),
    ]
    code, out, _ = run(capsys, "show", "bot@v0002", "--json")
    assert json.loads(out)["version"] == "v0002"
    assert "r=4" in run(capsys, "show", "bot")[1]
    assert run(capsys, "rollback", "bot")[1].strip() == "bot: rolled back v0003 -> v0002"
    assert (
        json.loads(run(capsys, "rollback", "bot", "--to", "v0001", "--json")[1])["current"]
        == "v0001"
    )
    assert run(capsys, "promote", "bot", "v0003")[0] == 0
    history = json.loads(run(capsys, "history", "bot", "--json")[1])
    assert [h["action"] for h in history][-3:] == ["rollback", "rollback", "promote"]
    assert "ACTION" in run(capsys, "history", "bot")[1]
    code, out, _ = run(capsys, "gc", "bot", "--keep", "1", "--json")
    assert json.loads(out)["deleted"] == ["v0001", "v0002"]


def test_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    good = write_adapter(tmp_path / "good", base_model=str(base))
    (base / "config.json").write_text(json.dumps(TINY_CONFIG))
    code, out, _ = run(capsys, "validate", str(good), "--base-model", str(base), "--max-rank", "16")
    assert code == 0 and out.startswith("OK")
    bad = write_adapter(tmp_path / "bad", r=32, modules=["q_proj", "lm_head"])
    code, out, _ = run(capsys, "validate", str(bad), "--max-rank", "16", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and any("max-lora-rank" in p for p in problems)
    assert any("lm_head" in p for p in problems)


def test_validate_detects_tampered_published_version(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "publish", "bot", str(write_adapter(tmp_path / "a")))
    vdir = env / "bot" / "versions" / "v0001"
    (vdir / "adapter_config.json").write_text(
        (vdir / "adapter_config.json").read_text().replace('"bias": "none"', '"bias": "none" ')
    )
    code, out, _ = run(capsys, "validate", str(vdir))
    assert code == 1 and "adapter_config.json" in out


def test_validate_reports_a_malformed_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "manifest.json").write_text("{bad")
    code, out, _ = run(capsys, "validate", str(folder))
    assert code == 1 and "manifest.json: invalid JSON" in out


def test_rollback_after_the_demo_goes_back_to_v2(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo publishes v1 and v2, then rolls back to v1; the user's rollback undoes that."""
    reg = Registry(env)
    reg.publish("bot", write_adapter(tmp_path / "a", seed=1))
    reg.publish("bot", write_adapter(tmp_path / "b", seed=2))
    reg.rollback("bot")
    assert reg.current("bot") == "v0001"
    code, out, err = run(capsys, "rollback", "bot")
    assert (code, out.strip()) == (0, "bot: rolled back v0001 -> v0002"), err
    code, out, _ = run(capsys, "rollback", "bot", "--json")  # a second rollback undoes the first
    assert json.loads(out)["current"] == "v0001"


def test_no_op_promote_and_rollback_write_no_history(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "publish", "bot", str(write_adapter(tmp_path / "a")))
    before = Registry(env).history("bot")
    code, out, _ = run(capsys, "promote", "bot", "v0001")
    assert code == 0 and "already current" in out
    code, out, _ = run(capsys, "rollback", "bot", "--to", "v0001", "--json")
    assert code == 0 and json.loads(out)["changed"] is False
    assert Registry(env).history("bot") == before
    code, _, err = run(capsys, "rollback", "bot")  # nothing to undo
    assert code == 1 and "--to" in err


def test_rollback_rule_is_stated_once_in_help_and_readme() -> None:
    from agent_finetune.cli.registry_commands import ROLLBACK_RULE

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert ROLLBACK_RULE in readme
    assert "undo the last pointer move" in " ".join(cli("rollback", "--help").stdout.split())


def test_missing_registry_and_unknown_name_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], env: Path
) -> None:
    code, _, err = run(capsys, "list", "--registry", str(tmp_path / "nonexistent"))
    assert code == 1 and "does not exist" in err and "nonexistent" in err
    run(capsys, "publish", "bot", str(write_adapter(tmp_path / "a")))
    code, out, err = run(capsys, "history", "nope")
    assert code == 1 and out == "" and "no adapter named 'nope'" in err and "bot" in err


def test_show_takes_name_or_name_at_version_by_the_naming_grammar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = registry_with_versions(tmp_path, "bot", 2)
    where = ("--registry", str(reg.root))
    code, out, _ = run(capsys, "show", "bot", *where)
    assert code == 0 and out.startswith("bot@v0001  (current)")
    code, out, _ = run(capsys, "show", "bot@v0002", *where, "--json")
    assert code == 0 and json.loads(out)["version"] == "v0002"
    for bad, message in [
        ("bot@v2", "invalid adapter name 'bot@v2'"),
        ("bot@", "invalid adapter name 'bot@'"),
        ("bot@v0009", "v0009"),
    ]:
        code, out, err = run(capsys, "show", bad, *where)
        assert code == 1 and out == "" and message in err and "Traceback" not in err
