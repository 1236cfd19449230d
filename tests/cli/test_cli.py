from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CONFIG, write_adapter

from agent_finetune.cli import main
from agent_finetune.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    registry = tmp_path / "registry"
    monkeypatch.setenv("AGENT_FINETUNE_REGISTRY", str(registry))
    return registry


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


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


def test_user_errors_exit_1_without_traceback(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "publish", "Bad/Name", str(write_adapter(tmp_path / "a")))
    assert code == 1 and err.startswith("error: invalid adapter name") and "Traceback" not in err
    code, _, err = run(capsys, "rollback", "nobody")
    assert code == 1 and "error:" in err
    env.mkdir()
    code, _, err = run(capsys, "promote", "bot", "v1")
    assert code == 1 and "invalid version" in err


def test_missing_registry_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENT_FINETUNE_REGISTRY", raising=False)
    code, _, err = run(capsys, "list")
    assert code == 1 and "--registry" in err and "AGENT_FINETUNE_REGISTRY" in err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["promote"])
    assert e.value.code == 2


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


def test_train_rejects_bad_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rank: 4\n")
    code, _, err = run(capsys, "train", "-c", str(cfg), "-d", "x.json")
    assert code == 1 and "lora_rank" in err and str(cfg) in err
    code, _, err = run(capsys, "train", "-d", "x.json", "--set", "nonsense")
    assert code == 1 and "KEY=VALUE" in err


def test_console_script_starts_without_heavy_imports() -> None:
    code = (
        "import sys; from agent_finetune.cli import build_parser; build_parser(); "
        "import agent_finetune.registry; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'vllm', 'peft', 'trl')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_reports_a_malformed_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "manifest.json").write_text("{bad")
    code, out, _ = run(capsys, "validate", str(folder))
    assert code == 1 and "manifest.json: invalid JSON" in out


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess: what a user's shell sees."""
    return subprocess.run(
        [sys.executable, "-m", "agent_finetune.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


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


def test_json_into_a_closed_pipe_is_quiet(env: Path, tmp_path: Path) -> None:
    reg = Registry(env)
    adapter = write_adapter(tmp_path / "a")
    for _ in range(3):
        reg.publish("bot", adapter)
    for _ in range(400):  # history --json well past a pipe buffer
        reg.rollback("bot", to="v0001")
        reg.promote("bot", "v0003")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_finetune.cli", "history", "bot", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "AGENT_FINETUNE_REGISTRY": str(env)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_set_unknown_key_is_reported_as_a_set_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: 4\n")
    proc = cli("train", "-c", str(cfg), "-d", "x.json", "--set", "lora_rr=8")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--set 'lora_rr=8'" in proc.stderr and "'lora_r'" in proc.stderr
    assert str(cfg) not in proc.stderr  # not blamed on the YAML file
    assert "train --help" in proc.stderr
    help_text = cli("train", "--help").stdout
    assert "lr_scheduler_type" in help_text and "lora_dropout" in help_text


def test_server_url_forms() -> None:
    from agent_finetune.registry.names import openai_base_url, server_root

    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert server_root(url) == "http://h:8000"
        assert openai_base_url(url) == "http://h:8000/v1"


def test_agent_example_without_a_server_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "agent.py"),
            "hi",
            "--server",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot reach http://127.0.0.1:9/v1" in proc.stderr
