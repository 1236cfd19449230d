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
from cli_helpers import cli

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


def test_train_rejects_bad_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rank: 4\n")
    assert_clear_error(train_cli(tmp_path, capsys, "-c", str(cfg)), "lora_rank", str(cfg))
    assert_clear_error(train_cli(tmp_path, capsys, "--set", "nonsense"), "KEY=VALUE")


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


def test_a_set_value_that_is_not_yaml_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train_cli(tmp_path, capsys, "--set", "system_prompt=[unclosed")
    assert_clear_error(result, "--set 'system_prompt=[unclosed'", "not a YAML value", "quote")


def unreadable_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may pass by mistake, and what the error must say about each."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("réponse {instruction}".encode("latin-1"))
    return {
        "missing": (tmp_path / "missing.yaml", "not found"),
        "folder": (tmp_path, "is a folder"),
        "latin-1": (latin1, "not UTF-8 (byte 1)"),
    }


@pytest.mark.parametrize("kind", ["missing", "folder", "latin-1"])
@pytest.mark.parametrize("option", ["--config", "--prompt-template"])
def test_an_unreadable_config_or_template_is_one_clear_line(
    option: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, message = unreadable_files(tmp_path)[kind]
    result = train_cli(tmp_path, capsys, option, str(path), "--model", str(tmp_path / "none"))
    assert_clear_error(result, str(path), message)


TINY_YAML = ROOT / "agent_finetune" / "assets" / "tiny-cpu.yaml"


def train_argv(tiny_model: Path, tmp_path: Path, *extra: str, verbose: bool = False) -> list[str]:
    """``python -m agent_finetune.cli [-v] train ... EXTRA`` on the tiny model and a small
    FAQ, 2 epochs."""
    faq = [
        ("What are your support hours?", "9:00-18:00 CET."),
        ("发货需要多长时间？", "三到五天。"),
    ]
    prefixes = ["", "Hi! ", "Please: ", "Quick question. ", "Hello, ", "Tell me: ", "Q: "]
    # 42 rows: 10+ optimizer steps in 2 epochs, so the trainer logs a loss (logging_steps 10).
    rows = [{"instruction": f"{p}{q}", "response": a} for q, a in faq for p in prefixes * 3]
    data = tmp_path / "faq.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return [
        *(sys.executable, "-m", "agent_finetune.cli", *(["-v"] if verbose else [])),
        *("train", "-c", str(TINY_YAML), "-d", str(data), "--model", str(tiny_model)),
        *("--output-dir", str(tmp_path / "run"), "--set", "num_train_epochs=2", *extra),
    ]


@pytest.mark.slow
def test_train_json_output_progress_and_published_prompt_format(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`train -v --json` with bf16 on this CPU and a prompt template: stdout is one JSON
    document, stderr one progress bar plus logs (trainer dicts only with -v), and the
    published version keeps the prompt format that load_model_and_tokenizer applies."""
    from agent_finetune.registry import Registry
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.inference import load_model_and_tokenizer

    template = tmp_path / "template.txt"
    template.write_text("### Q: {instruction}\n### A: {response}", encoding="utf-8")
    registry = tmp_path / "registry"
    cmd = train_argv(tiny_model, tmp_path, "--registry", str(registry), verbose=True)
    cmd += ["--prompt-template", str(template), "--set", "bf16=true", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # nothing else on stdout
    assert summary["published"] == "support-bot@v0001"
    err = proc.stderr
    assert "training: 100%" in err and "loss=" in err  # the one bar, with the loss
    assert "trainer: {'loss'" in err  # raw dicts: in the log, with -v
    assert "pin_memory" not in err and "examples/s" not in err and "Traceback" not in err
    assert "it/s]" not in err  # no Trainer/evaluation/dataset bars besides ours

    version_dir = Registry(registry).version_dir("support-bot", "v0001")
    fmt = json.loads((version_dir / "agent_finetune_format.json").read_text(encoding="utf-8"))
    assert fmt["prompt_template"] == template.read_text(encoding="utf-8")
    model, _ = load_model_and_tokenizer(FineTuningConfig(model_name=str(version_dir)))
    assert model.agent_finetune_format["prompt_template"] == fmt["prompt_template"]


@pytest.mark.slow
def test_train_without_json_prints_a_summary_once(tiny_model: Path, tmp_path: Path) -> None:
    cmd = train_argv(tiny_model, tmp_path, "--set", "adapter_name=null")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("adapter: ") and "train loss" in lines[1], proc.stdout
    assert "{" not in proc.stdout and "trainer: {" not in proc.stderr  # no raw dicts without -v
