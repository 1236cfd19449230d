"""GPU-only: the unsloth backend through train(), publish, and logits against plain PEFT.

Skipped without CUDA (conftest). Plain PEFT runs in a fresh process, because Unsloth patches
transformers' model classes in every process that imports it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "agent_finetune" / "assets"
pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# Logits are compared by relative norm ||a - b|| / ||b||. Unsloth's fused bf16 kernels and
# transformers' modules round differently, so they agree to bf16 precision (about 1e-2 on the
# tiny model), not bit for bit.
MAX_REL_NORM = 5e-2

_PEFT_LOGITS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, ids_path, out_path = sys.argv[1:]
ids = torch.load(ids_path).cuda()
out = {}
for dtype in (torch.bfloat16, torch.float32):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).cuda()
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        out[str(dtype)] = model(input_ids=ids).logits.float().cpu()
        with model.disable_adapter():
            out["base_" + str(dtype)] = model(input_ids=ids).logits.float().cpu()
out["unsloth_imported"] = "unsloth" in sys.modules
torch.save(out, out_path)
"""


def _rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


def test_auto_backend_is_unsloth_on_cuda() -> None:
    from agent_finetune.training.backend import resolve_backend
    from agent_finetune.training.config import FineTuningConfig

    assert resolve_backend(FineTuningConfig(backend="auto")) == "unsloth"


def test_unsloth_backend_trains_publishes_and_matches_peft(
    tmp_path: Path, tiny_model: Path
) -> None:
    import torch
    from transformers import TrainerCallback

    from agent_finetune.registry import Registry
    from agent_finetune.registry.adapter import load_base_config, validate_adapter
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    captured: dict[str, Any] = {}

    class Capture(TrainerCallback):  # type: ignore[misc]
        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            captured["model"] = kw["model"]

    registry = tmp_path / "registry"
    config = FineTuningConfig(
        model_name=str(tiny_model),
        backend="unsloth",
        bf16=True,
        max_seq_length=256,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=30,
        # large on purpose: the adapter must move the logits far more than rounding does
        learning_rate=5e-3,
        warmup_ratio=0.0,
        logging_steps=5,
        eval_steps=15,
        save_steps=1000,
        output_dir=str(tmp_path / "run"),
        adapter_name="gpu-test",
        registry_dir=str(registry),
    )
    result = train(config, EXAMPLES / "support_v1.json", callbacks=[Capture()])

    assert result.backend == "unsloth"
    assert math.isfinite(result.metrics["eval_loss"])
    assert result.metrics["peak_memory_gib"] > 0
    base_config = load_base_config(tiny_model)
    assert validate_adapter(result.adapter_dir, base_config=base_config, max_rank=16).ok
    assert result.published is not None
    reg = Registry(registry)
    assert reg.current("gpu-test") == result.published.version
    report = reg.verify("gpu-test", result.published.version, base_config=base_config, max_rank=16)
    assert report.ok, report.problems
    assert report.target_modules == sorted(config.target_modules)

    # Logits of the model Unsloth trained, then of plain PEFT on the base model + the
    # published adapter, in a process that never imported Unsloth.
    model = captured["model"]
    model.eval()
    ids = torch.randint(3, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unsloth_logits = model(input_ids=ids.cuda()).logits.float().cpu()
    assert unsloth_logits.shape == (2, 64, model.config.vocab_size)
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _PEFT_LOGITS,
            str(tiny_model),
            str(result.published.path),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "peft.pt"),
        ],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    peft = torch.load(tmp_path / "peft.pt")
    assert peft["unsloth_imported"] is False
    bf16, fp32 = peft[str(torch.bfloat16)], peft[str(torch.float32)]
    found = {
        "unsloth_vs_peft_bf16_rel": _rel(unsloth_logits, bf16),
        "unsloth_vs_peft_bf16_max_abs": float((unsloth_logits - bf16).abs().max()),
        "unsloth_vs_peft_fp32_rel": _rel(unsloth_logits, fp32),
        "peft_bf16_vs_fp32_rel": _rel(bf16, fp32),
        "adapter_effect_rel": _rel(fp32, peft["base_" + str(torch.float32)]),
        "argmax_agreement": float((unsloth_logits.argmax(-1) == fp32.argmax(-1)).float().mean()),
    }
    print("logits:", json.dumps(found))
    out = os.environ.get("GPU_TEST_REPORT")
    if out:
        Path(out).write_text(json.dumps(found, indent=2))
    # Unsloth in bf16 is as close to the fp32 PEFT reference as PEFT itself in bf16 is.
    assert found["unsloth_vs_peft_fp32_rel"] < max(2 * found["peft_bf16_vs_fp32_rel"], 1e-3)
    assert found["unsloth_vs_peft_fp32_rel"] < MAX_REL_NORM
    assert found["unsloth_vs_peft_bf16_rel"] < MAX_REL_NORM
    assert found["argmax_agreement"] > 0.9
    assert found["adapter_effect_rel"] > 10 * found["unsloth_vs_peft_fp32_rel"]
