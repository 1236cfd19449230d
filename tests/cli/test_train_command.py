"""`agent-finetune train` as a user meets it: user errors are one clear line, never a
traceback, and they come before any model loads."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_finetune.cli import main

ROOT = Path(__file__).resolve().parents[2]


def train_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    """``agent-finetune train -d data.json ARGV`` in this process; (rc, stdout, stderr)."""
    data = tmp_path / "data.json"
    if not data.exists():
        data.write_text(json.dumps([{"instruction": "q", "response": "a"}] * 4), encoding="utf-8")
    code = main(["train", "-d", str(data), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clear_error(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 1, err[-2000:]
    assert "Traceback" not in err and out == "", err[-2000:]
    for needle in needles:
        assert needle in err, err[-2000:]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """huggingface_hub's settings, as HF_HUB_OFFLINE / HF_ENDPOINT set them at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return constants


def test_hub_model_without_network_fails_fast_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No HF_HUB_OFFLINE, the hub unreachable: the old code hung in retries, then a traceback.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    result = train_cli(tmp_path, capsys, "--model", "some-org/some-model")
    assert_clear_error(result, "'some-org/some-model'", "cannot be reached", "HF_HUB_OFFLINE=1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    result = train_cli(tmp_path, capsys, "--model", "some-org/some-model")
    assert_clear_error(result, "nor in the Hugging Face cache", "HF_HUB_OFFLINE=1")


def test_shipped_gpu_config_on_a_cpu_is_a_clear_error(tmp_path: Path) -> None:
    """configs/qwen2.5-7b-unsloth.yaml (bf16: true, a hub model) run as a user would, on a
    host without a GPU or the model (the old code: a bf16 traceback)."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "q", "response": "a"}] * 4), encoding="utf-8")
    config = ROOT / "configs" / "qwen2.5-7b-unsloth.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "agent_finetune.cli", "train", "-c", str(config), "-d", str(data)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")},
        timeout=300,
        cwd=tmp_path,
    )
    assert_clear_error((proc.returncode, proc.stdout, proc.stderr), "unsloth/Qwen2.5-7B-Instruct")
    assert "bf16" not in proc.stderr  # bf16 on a CPU is fine now


def test_fp16_on_a_cpu_says_use_bf16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = train_cli(tmp_path, capsys, "--model", str(tmp_path), "--set", "fp16=true")
    assert_clear_error(result, "fp16: true needs a CUDA GPU", "bf16: true")


def test_use_wandb_without_wandb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = train_cli(
        tmp_path, capsys, "--set", "use_wandb=true", "--set", "wandb_project=p", "--model", "."
    )
    assert_clear_error(result, "use_wandb", "pip install wandb")


def test_misspelled_lr_scheduler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = train_cli(tmp_path, capsys, "--set", "lr_scheduler_type=cosin")
    assert_clear_error(result, "lr_scheduler_type", "'cosine'")


def test_missing_template_placeholder_fails_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "t.txt"
    template.write_text("[{domain}] {instruction}\n{response}", encoding="utf-8")
    # A model folder that does not exist: had the model been loaded first, that would fail.
    result = train_cli(
        tmp_path, capsys, "--prompt-template", str(template), "--model", str(tmp_path / "no")
    )
    assert_clear_error(result, "{domain}", "template_vars")
