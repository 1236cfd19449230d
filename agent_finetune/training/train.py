"""Train a LoRA adapter: data -> backend -> adapter -> publish. Read it top to bottom.

``train(config, data_path)`` is the entry point of the CLI and of ``run_fine_tuning`` (the
seed guide's API). Works under ``torchrun``/``accelerate launch`` with the hf backend; only
rank 0 writes the final adapter, the plots and the registry.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_finetune.errors import ConfigError, DataError, UnservableAdapterError
from agent_finetune.registry import Registry, VersionInfo
from agent_finetune.registry.adapter import validate_adapter
from agent_finetune.training import checkpointing
from agent_finetune.training.backend import (
    Backend,
    cuda_available,
    liger_usable,
    load_for_training,
    resolve_backend,
)
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.data import Dataset, Example, load_dataset_file
from agent_finetune.training.prompts import TokenizedData, check_template, tokenize_examples
from agent_finetune.training.replay import replay_examples

if TYPE_CHECKING:
    from agent_finetune.training.gate import GateResult

log = logging.getLogger("agent_finetune")
FINAL_DIR = "final_model"
FORMAT_FILE = "agent_finetune_format.json"


@dataclass
class TrainResult:
    """What a run produced: the adapter folder, metrics and the published version, if any.

    ``is_main`` is False on the other ranks of a multi-process run: they write nothing and
    print nothing.
    """

    adapter_dir: Path
    run_dir: Path
    backend: Backend
    metrics: dict[str, Any] = field(default_factory=dict)
    published: VersionInfo | None = None
    is_main: bool = True
    gate: GateResult | None = None


def train(
    config: FineTuningConfig,
    data_path: str | os.PathLike[str],
    *,
    train_test_split: float = 0.1,
    prompt_template: str | None = None,
    callbacks: list[Any] | None = None,
    publish_reason: str | None = None,
) -> TrainResult:
    """Fine-tune ``config.model_name`` on ``data_path`` and save ``<output_dir>/final_model``.

    ``prompt_template`` overrides ``config.prompt_template``. ``callbacks`` are extra
    transformers TrainerCallbacks (benchmarks use them to time steps).
    """
    template = prompt_template if prompt_template is not None else config.prompt_template
    _check_optional_packages(config)
    backend = resolve_backend(config)  # imports Unsloth (first) when it is chosen

    # 1. data: parse and validate every row (and the template against them) before any model
    dataset, train_rows, eval_rows = _load_data(config, data_path, train_test_split, template)

    # 2. backend: model with fresh LoRA weights, rows tokenized, trained
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the training bar is the one
    set_seed(config.seed)
    # logs the decision
    plan = checkpointing.plan_for(config, backend, liger=backend == "hf" and liger_usable())
    model, tokenizer = load_for_training(config, backend, plan)
    replay = replay_examples(config, model, tokenizer, template, len(train_rows))
    train_rows = train_rows + replay
    train_tok, eval_tok = _tokenize(config, tokenizer, template, train_rows, eval_rows)

    def make_trainer(model: Any, plan: checkpointing.Plan) -> Any:
        rows = train_tok.rows, eval_tok.rows
        return _make_trainer(config, backend, model, tokenizer, *rows, callbacks, plan)

    def reload(plan: checkpointing.Plan) -> tuple[Any, Any]:
        """Fresh LoRA weights and a trainer for ``plan`` (the out-of-memory retry)."""
        set_seed(config.seed)
        model, _ = load_for_training(config, backend, plan)
        return model, make_trainer(model, plan)

    trainer = make_trainer(model, plan)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model, trainer, metrics = _fit(model, trainer, plan, reload, backend, train_tok, eval_tok)
    metrics["precision"] = config.precision
    metrics["replay_rows"] = len(replay)
    run_dir = Path(config.output_dir)
    result = TrainResult(run_dir / FINAL_DIR, run_dir, backend, metrics)
    if not trainer.is_world_process_zero():
        result.is_main = False
        return result

    # 3. adapter: standard PEFT safetensors, checked as the server will check it
    _write_run(trainer, model, tokenizer, result, config, template)

    # 4. publish
    result.published = _publish(config, result.adapter_dir, dataset, metrics, publish_reason)
    if result.published is not None and config.promotion.policy == "if_better":
        registry = Registry(str(config.publish_registry))
        result.gate = _gate(config, registry, result.published.version)
    return result


def _write_run(
    trainer: Any,
    model: Any,
    tokenizer: Any,
    result: TrainResult,
    config: FineTuningConfig,
    template: str | None,
) -> None:
    """final_model/ (validated for vLLM), metrics.json, loss_curve.png, config.yaml."""
    _save_adapter(model, tokenizer, result.adapter_dir, config, template)
    report = validate_adapter(result.adapter_dir)
    if not report.ok:
        raise UnservableAdapterError(
            f"the trained adapter in {result.adapter_dir} cannot be served:\n  - "
            + "\n  - ".join(report.problems)
        )
    run_dir = result.run_dir
    (run_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
    _plot_losses(trainer.state.log_history, run_dir / "loss_curve.png")
    config.to_yaml(run_dir / "config.yaml")
    log.info("adapter saved to %s (%s)", result.adapter_dir, _summary(result.metrics))


def _check_optional_packages(config: FineTuningConfig) -> None:
    if config.use_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "use_wandb: true needs the wandb package: `pip install wandb` and `wandb login`, "
            "or set use_wandb: false"
        )


def _load_data(
    config: FineTuningConfig,
    data_path: str | os.PathLike[str],
    train_test_split: float,
    template: str | None,
) -> tuple[Dataset, list[Example], list[Example]]:
    dataset = load_dataset_file(
        data_path, field_map=config.field_map, system_prompt=config.system_prompt
    )
    if template is not None:  # a missing placeholder fails here, not after the model loads
        check_template(template, dataset.examples, config.template_vars)
    train_rows, eval_rows = dataset.split(train_test_split, config.seed)
    log.info(
        "dataset %s: %d rows (%s format), %d train / %d eval",
        dataset.path,
        len(dataset),
        dataset.format,
        len(train_rows),
        len(eval_rows),
    )
    if not eval_rows:
        log.warning(
            "train_test_split=%s leaves no eval rows out of %d; skipping evaluation",
            train_test_split,
            len(dataset),
        )
    return dataset, train_rows, eval_rows


def _tokenize(
    config: FineTuningConfig,
    tokenizer: Any,
    template: str | None,
    train_rows: list[Example],
    eval_rows: list[Example],
) -> tuple[TokenizedData, TokenizedData]:
    """Prompt masked, truncated to max_seq_length; truncated rows reported."""
    tok_kwargs: dict[str, Any] = {
        "max_seq_length": config.max_seq_length,
        "prompt_template": template,
        "template_vars": config.template_vars,
        "responses_only": config.train_on_responses_only,
    }
    train_tok = tokenize_examples(tokenizer, train_rows, **tok_kwargs)
    eval_tok = tokenize_examples(tokenizer, eval_rows, **tok_kwargs)
    truncated = train_tok.truncated + eval_tok.truncated
    if truncated:
        log.warning(
            "%d of %d rows are longer than max_seq_length=%d and were truncated (%d dropped: "
            "the prompt alone filled the limit); raise max_seq_length to keep them whole",
            truncated,
            len(train_rows) + len(eval_rows),
            config.max_seq_length,
            train_tok.dropped + eval_tok.dropped,
        )
    if not train_tok.rows:
        raise DataError("no training rows left after tokenization")
    return train_tok, eval_tok


def _fit(
    model: Any,
    trainer: Any,
    plan: checkpointing.Plan,
    reload: Callable[[checkpointing.Plan], tuple[Any, Any]],
    backend: Backend,
    train_tok: TokenizedData,
    eval_tok: TokenizedData,
) -> tuple[Any, Any, dict[str, Any]]:
    """Evaluate, train, evaluate again: (model, trainer, the run's metrics, the same on every
    rank). When ``gradient_checkpointing: auto`` chose off and memory runs out, train once
    more from fresh LoRA weights with checkpointing on, and say so."""
    eval_before = trainer.evaluate()["eval_loss"] if eval_tok.rows else None
    started = time.perf_counter()
    retry: checkpointing.Plan | None = None
    try:
        with frozen_heap():
            out = trainer.train()
    except Exception as e:
        if not checkpointing.may_retry(plan, e):
            raise
        retry = plan.after_oom(e)  # outside this block, so the traceback's tensors are freed
    if retry is not None:
        plan = retry
        log.warning("gradient checkpointing: %s", plan.reason)
        del trainer, model
        checkpointing.release_memory()
        model, trainer = reload(plan)
        started = time.perf_counter()
        with frozen_heap():
            out = trainer.train()
    train_seconds = time.perf_counter() - started
    eval_after = trainer.evaluate()["eval_loss"] if eval_tok.rows else None
    metrics = {
        "backend": backend,
        "train_rows": len(train_tok.rows),
        "eval_rows": len(eval_tok.rows),
        "truncated_rows": train_tok.truncated + eval_tok.truncated,
        "dropped_rows": train_tok.dropped + eval_tok.dropped,
        "train_loss": out.training_loss,
        "eval_loss_before": eval_before,
        "eval_loss": eval_after,
        "train_seconds": round(train_seconds, 3),
        "global_steps": trainer.state.global_step,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_tokens_per_second": round(trainer.state.num_input_tokens_seen / train_seconds, 1),
        "peak_memory_gib": _peak_memory_gib(),
        "world_size": trainer.args.world_size,
        "gradient_checkpointing": plan.as_metrics(),
        "attention": getattr(model.config, "_attn_implementation", None),
        "liger_kernel": bool(trainer.args.use_liger_kernel),
    }
    return model, trainer, metrics


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep what is alive when training starts (the model, the libraries, the data) out of the
    cyclic garbage collector's walks until training ends, as vLLM does after start-up. A full
    collection visits every tracked object, several hundred thousand with torch, transformers
    and TRL loaded (more with Unsloth), and stalls whichever training step it lands in;
    objects the steps create are still collected as usual. Undone afterwards, also on error,
    so that what the run leaves behind (a model dropped for the out-of-memory retry) can be
    collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _publish(
    config: FineTuningConfig,
    adapter_dir: Path,
    dataset: Dataset,
    metrics: dict[str, Any],
    reason: str | None,
) -> VersionInfo | None:
    registry_dir = config.publish_registry
    if not config.adapter_name:
        return None
    if not registry_dir:
        log.warning(
            "adapter_name is set but no registry_dir / AGENT_FINETUNE_REGISTRY; not publishing"
        )
        return None
    info = Registry(registry_dir).publish(
        config.adapter_name,
        adapter_dir,
        metadata={
            "training_config": config.model_dump(mode="json"),
            # absolute: `retrain` reads it back from wherever it runs
            "dataset": {**dataset.describe(), "path": str(dataset.path.resolve())},
            "metrics": metrics,
        },
        reason=reason or f"trained on {dataset.path.name}",
        make_current=config.promotion.policy == "always",  # if_better: the gate decides
    )
    log.info("published %s@%s to %s", config.adapter_name, info.version, registry_dir)
    return info


def _gate(config: FineTuningConfig, registry: Registry, version: str) -> GateResult:
    """Evaluate the new version against the live one; promote only if it is better."""
    from agent_finetune.training.gate import gate

    promotion = config.promotion
    assert config.adapter_name and promotion.eval_data  # checked by the config
    held_out = load_dataset_file(
        promotion.eval_data, field_map=config.field_map, system_prompt=config.system_prompt
    )
    result = gate(
        registry,
        config.adapter_name,
        version,
        held_out,
        metric=promotion.metric,
        min_delta=promotion.min_delta,
        server=promotion.server,
        max_tokens=promotion.max_tokens,
        base_model=None if promotion.server else config.model_name,
    )
    log.info(
        "gate: %s@%s %s (%s)",
        config.adapter_name,
        version,
        "promoted" if result.promoted else "not promoted",
        result.reason,
    )
    return result


def run_fine_tuning(
    data_path: str | os.PathLike[str],
    config: FineTuningConfig | None = None,
    train_test_split: float = 0.1,
    prompt_template: str | None = None,
) -> str:
    """The seed guide's entry point: train, publish if configured, return the adapter path."""
    result = train(
        config or FineTuningConfig(),
        data_path,
        train_test_split=train_test_split,
        prompt_template=prompt_template,
    )
    return str(result.adapter_dir)


def _make_trainer(
    config: FineTuningConfig,
    backend: Backend,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, list[int]]],
    eval_rows: list[dict[str, list[int]]],
    callbacks: list[Any] | None,
    plan: checkpointing.Plan,
) -> Any:
    import datasets
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from agent_finetune.training.progress import ProgressBar

    datasets.disable_progress_bars()  # TRL's internal dataset passes: no bar each
    if config.use_wandb:
        os.environ.setdefault("WANDB_PROJECT", config.wandb_project or "agent-finetune")
    has_eval = bool(eval_rows)
    args = SFTConfig(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None,
        fp16=config.fp16,
        bf16=config.bf16,
        # Unsloth applies its own (offloaded) checkpointing in get_peft_model.
        gradient_checkpointing=plan.recompute and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # fused RMSNorm/SwiGLU/RoPE and linear cross-entropy (no logits tensor) on CUDA
        use_liger_kernel=backend == "hf" and liger_usable(),
        max_length=config.max_seq_length,
        packing=config.packing,
        padding_free=config.packing,
        report_to=["wandb"] if config.use_wandb else "none",
        run_name=config.wandb_run_name,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
        # No CUDA: accelerate must be told it is on the CPU. Otherwise several processes get
        # no distributed state (DistributedType.NO): no DDP gradient sync, and each rank's loss
        # is scaled by the world size without the token counts being gathered (2x loss); and
        # TrainingArguments refuses bf16 ("doesn't support bf16/gpu").
        use_cpu=not cuda_available(),
        dataloader_pin_memory=cuda_available(),
        ddp_backend="gloo" if _distributed() and not cuda_available() else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # ProgressBar instead
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if has_eval else None,
        processing_class=tokenizer,
        callbacks=[ProgressBar(), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # prints every log dict to stdout
    trainer.remove_callback(ProgressCallback)
    return trainer


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _save_adapter(
    model: Any, tokenizer: Any, out: Path, config: FineTuningConfig, template: str | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # How prompts were built, so load_model_and_tokenizer/generate_text can do the same.
    fmt = {
        "prompt_template": template,
        "template_vars": config.template_vars,
        "system_prompt": config.system_prompt,
    }
    (out / FORMAT_FILE).write_text(json.dumps(fmt, ensure_ascii=False, indent=2), encoding="utf-8")


def _peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return round(float(torch.cuda.max_memory_allocated()) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB


def _plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(metrics: dict[str, Any]) -> str:
    parts = [f"train_loss={metrics['train_loss']:.4f}"]
    if metrics.get("eval_loss") is not None and metrics.get("eval_loss_before") is not None:
        parts.append(f"eval_loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}")
    parts.append(f"{metrics['train_tokens_per_second']} tok/s")
    return ", ".join(parts)
