"""`agent_finetune.training.progress`: one bar on stderr from rank 0, raw logs at DEBUG."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from agent_finetune.training.progress import ProgressBar


def state(step: int, *, rank0: bool = True) -> SimpleNamespace:
    return SimpleNamespace(max_steps=4, global_step=step, is_world_process_zero=rank0)


def test_the_bar_counts_steps_and_shows_the_latest_losses(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    bar = ProgressBar()
    bar.on_train_begin(None, state(0), None)
    with caplog.at_level(logging.DEBUG, logger="agent_finetune"):
        for step in range(1, 5):
            bar.on_step_end(None, state(step), None)
            bar.on_log(None, state(step), None, logs={"loss": 2.0 / step, "learning_rate": 1e-4})
        bar.on_log(None, state(4), None, logs={"eval_loss": 0.25})
    assert bar.bar is not None and bar.bar.n == 4
    assert bar.shown == {"loss": "0.5", "eval_loss": "0.25"}
    bar.on_train_end(None, state(4), None)
    captured = capsys.readouterr()
    assert captured.out == "" and "training" in captured.err and "4/4" in captured.err
    assert "learning_rate" in caplog.text  # every trainer log, at DEBUG


def test_other_ranks_show_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    bar = ProgressBar()
    bar.on_train_begin(None, state(0, rank0=False), None)
    bar.on_step_end(None, state(1, rank0=False), None)
    bar.on_log(None, state(1, rank0=False), None, logs={"loss": 1.0})
    bar.on_train_end(None, state(1, rank0=False), None)
    assert bar.bar is None and capsys.readouterr() == ("", "")
