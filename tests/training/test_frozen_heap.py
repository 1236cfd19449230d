"""Training runs with the start-up heap frozen (no full garbage collection walks the model and
the libraries mid-step), and unfreezes it afterwards, also when training fails."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.train import frozen_heap, train

EXAMPLES = Path(__file__).resolve().parents[2] / "agent_finetune" / "assets"


def test_frozen_heap_freezes_inside_and_unfreezes_after_an_error() -> None:
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("out of memory")
    assert gc.get_freeze_count() == 0


def test_training_steps_run_with_the_heap_frozen(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    seen: list[int] = []

    class Watch(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen.append(gc.get_freeze_count())

    config = FineTuningConfig(
        model_name=str(tiny_model),
        max_seq_length=64,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        output_dir=str(tmp_path / "run"),
    )
    train(config, EXAMPLES / "support_v1.json", train_test_split=0.0, callbacks=[Watch()])
    assert len(seen) == 2 and all(n > 0 for n in seen)
    assert gc.get_freeze_count() == 0
