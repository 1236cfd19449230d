from __future__ import annotations

import pytest

from agent_finetune.errors import BackendError, ConfigError
from agent_finetune.training.backend import cuda_available, resolve_backend
from agent_finetune.training.config import FineTuningConfig


def test_hf_is_always_available_and_auto_falls_back() -> None:
    assert resolve_backend(FineTuningConfig(backend="hf")) == "hf"
    if not cuda_available():
        assert resolve_backend(FineTuningConfig(backend="auto")) == "hf"


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only error")
def test_unsloth_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match=r"no CUDA GPU.*backend: hf"):
        resolve_backend(FineTuningConfig(backend="unsloth"))


def test_unservable_target_modules_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="wte"):
        FineTuningConfig.from_dict({"target_modules": ["q_proj", "wte"]}, source="test")
    FineTuningConfig()
