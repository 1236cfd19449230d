"""The numpy adapter writer: valid PEFT folders at any model's shapes, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent_finetune.registry.adapter import (
    LINEAR_MODULES,
    read_safetensors_header,
    validate_adapter,
)
from agent_finetune.training.numpy_adapter import TINY_CONFIG, write_adapter


def test_writes_a_folder_the_registry_accepts_at_the_base_models_shapes(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a", r=8, modules=LINEAR_MODULES, layers=3)
    report = validate_adapter(
        folder, max_rank=8, base_config={**TINY_CONFIG, "num_hidden_layers": 3}
    )
    assert report.ok, report.problems
    header = read_safetensors_header(folder / "adapter_model.safetensors")
    assert len(header) == 2 * 3 * len(LINEAR_MODULES)
    q_a = header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    down_b = header["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    assert q_a.shape == (8, TINY_CONFIG["hidden_size"])
    assert down_b.shape == (TINY_CONFIG["hidden_size"], 8)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["target_modules"] == sorted(LINEAR_MODULES)


def test_dtype_seed_and_extras(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", seed=1, dtype=np.float16, extra_tensors={"x.weight": (2, 3)})
    b = write_adapter(tmp_path / "b", seed=2, dtype=np.float16)
    header = read_safetensors_header(a / "adapter_model.safetensors")
    assert {t.dtype for t in header.values()} == {"F16"}
    assert header["x.weight"].shape == (2, 3)
    data_a = (a / "adapter_model.safetensors").read_bytes()
    assert data_a != (b / "adapter_model.safetensors").read_bytes()
    again = write_adapter(
        tmp_path / "c", seed=1, dtype=np.float16, extra_tensors={"x.weight": (2, 3)}
    )
    assert (again / "adapter_model.safetensors").read_bytes() == data_a


def test_imports_no_torch() -> None:
    code = (
        "import sys\nimport agent_finetune.training.numpy_adapter\nprint('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
