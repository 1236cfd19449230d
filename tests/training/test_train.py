"""Integration: training the tiny model visibly teaches it (CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_finetune import (
    FineTuningConfig,
    generate_text,
    load_model_and_tokenizer,
    run_fine_tuning,
)
from agent_finetune.registry import Registry
from agent_finetune.training.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "agent_finetune" / "assets" / "tiny-cpu.yaml"
FACTS = [
    ("What are your support hours?", "Monday to Friday, 9:00-18:00 CET."),
    ("How long does shipping take?", "Three to five business days."),
    ("Can I return an item?", "Yes, within 30 days for a full refund."),
    ("How do I reset my password?", "Open Settings, then Account, then Reset password."),
    ("如何联系人工客服？", "在聊天中输入“人工”即可。"),
    ("发货需要多长时间？", "标准配送需要三到五个工作日。"),
    ("Do you ship internationally?", "Yes, to forty countries."),
    ("Where is my invoice?", "Under Billing, then Invoices."),
]
PARAPHRASES = ["{q}", "Hi! {q}", "Please tell me: {q}", "{q} Thanks.", "Quick question. {q}"]


def tiny_config(tiny_model: Path, out: Path, **kw: Any) -> FineTuningConfig:
    return FineTuningConfig.from_yaml(
        TINY_YAML,
        **{"model_name": str(tiny_model), "output_dir": str(out), "adapter_name": None, **kw},
    )


@pytest.fixture(scope="module")
def paraphrase_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"instruction": p.format(q=q), "response": a} for q, a in FACTS for p in PARAPHRASES]
    path = tmp_path_factory.mktemp("data") / "faq.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(
    tiny_model: Path, paraphrase_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    out = tmp_path_factory.mktemp("run")
    registry = tmp_path_factory.mktemp("registry")
    cfg = tiny_config(
        tiny_model, out, adapter_name="faq-bot", registry_dir=str(registry), num_train_epochs=20
    )
    return train(cfg, paraphrase_data, train_test_split=0.2), registry


def test_eval_loss_falls_by_more_than_half(trained: Any) -> None:
    result, _ = trained
    m = result.metrics
    assert m["eval_rows"] == 8 and m["backend"] == "hf"
    assert m["eval_loss"] < m["eval_loss_before"] / 2, m
    assert (result.run_dir / "loss_curve.png").stat().st_size > 1000
    assert json.loads((result.run_dir / "metrics.json").read_text())["eval_loss"] == m["eval_loss"]


def test_trained_answer_reproduced_and_base_differs(trained: Any, tiny_model: Path) -> None:
    result, _ = trained
    model, tok = load_model_and_tokenizer(FineTuningConfig(model_name=str(result.adapter_dir)))
    base, base_tok = load_model_and_tokenizer(FineTuningConfig(model_name=str(tiny_model)))
    question, answer = FACTS[1]
    assert generate_text(model, tok, question, max_new_tokens=30, temperature=0) == answer
    assert generate_text(base, base_tok, question, max_new_tokens=30, temperature=0) != answer
    q_zh, a_zh = FACTS[5]
    assert generate_text(model, tok, q_zh, max_new_tokens=30, temperature=0) == a_zh


def test_adapter_loads_with_plain_peft_and_is_published(trained: Any, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, registry = trained
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), result.adapter_dir
    )
    assert model.peft_config["default"].r == 16
    reg = Registry(registry)
    assert reg.current("faq-bot") == "v0001"
    manifest = reg.manifest("faq-bot", "v0001")
    assert manifest["metrics"]["eval_loss"] == result.metrics["eval_loss"]
    assert manifest["dataset"]["rows"] == 40 and len(manifest["dataset"]["sha256"]) == 64
    assert manifest["training_config"]["lora_r"] == 16
    assert reg.verify("faq-bot", "v0001", max_rank=16).ok


def test_seed_guide_example_runs_as_written(tiny_model: Path, tmp_path: Path) -> None:
    """The seed guide's usage, with the tiny model in place of a hub model."""
    data = [
        {
            "instruction": "什么是机器学习？",
            "response": "机器学习是让计算机从数据中学习的方法。",
            "domain": "人工智能",
        },
        {
            "instruction": "What is LoRA?",
            "response": "A low-rank adapter for fine-tuning.",
            "domain": "人工智能",
        },
    ] * 4
    (tmp_path / "data.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    config = FineTuningConfig(
        model_name=str(tiny_model),
        output_dir=str(tmp_path / "my_model"),
        max_seq_length=256,
        lora_r=8,
        lora_alpha=16,
        learning_rate=5e-3,
        batch_size=2,
        num_train_epochs=30,
        gradient_checkpointing=False,
    )
    prompt_template = "### 领域: {domain}\n### 指令:\n{instruction}\n### 回答:\n{response}"
    # {domain} comes from the rows, as in the seed guide (no template_vars).
    model_path = run_fine_tuning(
        data_path=str(tmp_path / "data.json"),
        config=config,
        train_test_split=0.1,
        prompt_template=prompt_template,
    )
    assert model_path == str(tmp_path / "my_model" / "final_model")

    config = FineTuningConfig(model_name=model_path)
    model, tokenizer = load_model_and_tokenizer(config)
    # As the guide calls it: {domain} is not passed, so it warns and still generates.
    with pytest.warns(UserWarning, match="domain"):
        response = generate_text(
            model, tokenizer, "What is LoRA?", max_new_tokens=20, temperature=0.7
        )
    assert isinstance(response, str)
    assert "### 回答" not in response  # only the generated text comes back
    greedy = generate_text(
        model, tokenizer, "What is LoRA?", max_new_tokens=20, temperature=0, domain="人工智能"
    )
    assert greedy == "A low-rank adapter for fine-tuning."


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
    # --multi_gpu selects accelerate's torch.distributed launcher; without CUDA it runs on the
    # CPU with gloo (--cpu would start a single process).
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29534",
    ],
}


@pytest.fixture(scope="module")
def one_process(
    tiny_model: Path, paraphrase_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The metrics of the multi-process runs' settings, trained in one process."""
    out = tmp_path_factory.mktemp("one")
    return train(tiny_config(tiny_model, out, num_train_epochs=2), paraphrase_data).metrics


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_rank0_publishes(
    launcher: str,
    tiny_model: Path,
    paraphrase_data: Path,
    tmp_path: Path,
    one_process: dict[str, Any],
) -> None:
    registry = tmp_path / "registry"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AGENT_FINETUNE_REGISTRY": str(registry)}
    cmd = [
        sys.executable,
        *LAUNCHERS[launcher],
        "-m",
        "agent_finetune.cli",
        "train",
        "-c",
        str(TINY_YAML),
        "-d",
        str(paraphrase_data),
        "--model",
        str(tiny_model),
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        "num_train_epochs=2",
        "--json",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Registry(registry).versions("support-bot") == ["v0001"]  # published once, by rank 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # One JSON document on stdout: rank 0 reports, rank 1 prints nothing.
    assert json.loads(proc.stdout)["metrics"] == metrics
    # The same loss scale as one process (it was doubled: each rank's loss was multiplied by
    # the world size while the token count was not gathered). The loss before training is
    # the base model's on the same eval rows, so it must match closely.
    one = one_process
    assert metrics["eval_loss_before"] == pytest.approx(one["eval_loss_before"], rel=0.05)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["train_loss"] == pytest.approx(one["train_loss"], rel=0.3)
    manifest = Registry(registry).manifest("support-bot", "v0001")
    assert manifest["metrics"]["eval_loss_before"] == metrics["eval_loss_before"]
