from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CONFIG, write_adapter

from agent_finetune.cli import main


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
