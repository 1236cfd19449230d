"""What a training run shows: one progress bar (loss, ETA) on stderr, raw logs only with -v.

The Trainer's own output (a log dict printed per logging step, a bar per evaluation, bars for
its dataset preparation) is replaced by this one callback, shown by rank 0 only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("agent_finetune")


class ProgressBar(TrainerCallback):  # type: ignore[misc]
    """A tqdm bar over optimiser steps with the latest train and eval loss; logs at DEBUG."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, desc="training", unit="step", file=sys.stderr, leave=True
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        log.debug("trainer: %s", logs)
        if self.bar is not None:
            new: dict[str, str] = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if k in logs}
            if new:
                self.shown.update(new)
                self.bar.set_postfix(self.shown, refresh=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
