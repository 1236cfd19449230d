"""FineTuningConfig: every training setting, typed, with defaults and help text.

Loaded from and saved to YAML. A mistyped key is an error that names the key and the file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent_finetune.errors import ConfigError
from agent_finetune.registry.adapter import LINEAR_MODULES, SERVABLE_MODULES, unservable_modules

DEFAULT_TARGET_MODULES = list(LINEAR_MODULES)
# transformers schedulers that need no extra lr_scheduler_kwargs (a test checks the names
# against transformers.SchedulerType).
LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class PromotionConfig(BaseModel):
    """What `train` does after publishing: make the version current, gate it, or neither."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    policy: Literal["always", "if_better", "never"] = Field(
        "always",
        description="always: the new version becomes current; if_better: only if it beats the "
        "live version on eval_data (see `agent-finetune promote --if-better`); never: publish "
        "only.",
    )
    eval_data: str | None = Field(
        None, description="Held-out dataset for if_better (same formats as training data)."
    )
    metric: Literal["loglik", "f1", "exact"] = Field(
        "loglik", description="Metric the gate compares: loglik, f1 or exact."
    )
    min_delta: float = Field(
        0.0, description="The 95% CI of the mean per-row gain must lie above this."
    )
    server: str | None = Field(
        None,
        description="OpenAI base URL of a server with the plugin to evaluate through; "
        "none: offline with PEFT on model_name.",
    )
    max_tokens: int = Field(
        128, ge=1, description="Answer length for exact/f1 (greedy), as the agent sends it."
    )

    @model_validator(mode="after")
    def _check(self) -> PromotionConfig:
        if self.policy == "if_better" and not self.eval_data:
            raise ValueError("policy if_better needs eval_data (a held-out dataset file)")
        return self


class ReplayConfig(BaseModel):
    """The replay guard (agent_finetune.training.replay): keep the base model's skills."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ratio: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Replay rows per training row: the base model's own greedy answers to "
        "general prompts, mixed into training so new facts do not overwrite what it knew. "
        "0 turns the guard off.",
    )
    max_new_tokens: int = Field(
        64, ge=1, le=1024, description="Longest base answer; longer ones are left out."
    )
    prompts: str | None = Field(
        None, description="A JSON array of prompts; null: the packaged general prompts."
    )


class FineTuningConfig(BaseModel):
    """Settings for one LoRA fine-tuning run (seed-guide field names kept)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- model -------------------------------------------------------------------------------
    model_name: str = Field(
        "unsloth/Qwen2.5-7B-Instruct",
        description="Base model: a Hugging Face model id or a local folder. For "
        "`load_model_and_tokenizer`, an adapter folder (with adapter_config.json) also works.",
    )
    max_seq_length: int = Field(
        2048,
        ge=16,
        description="Longest training sequence in tokens; longer rows are truncated "
        "and counted in the data report.",
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the base model in 4-bit (bitsandbytes; CUDA only)."
    )
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto",
        description="Training backend. `unsloth` needs a CUDA GPU and Unsloth installed; `hf` "
        "(transformers + PEFT + TRL) runs anywhere; `auto` picks unsloth when it can, else hf.",
    )

    # -- LoRA --------------------------------------------------------------------------------
    lora_r: int = Field(
        16,
        ge=1,
        le=512,
        description="LoRA rank. Must be <= the server's "
        "--max-lora-rank (default 16 in `agent-finetune serve`).",
    )
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input (0 is fastest and what Unsloth optimises for).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Linear layers that get LoRA weights. vLLM serves only the attention and MLP "
        "projections; embed_tokens/lm_head are refused.",
    )

    # -- optimisation ------------------------------------------------------------------------
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(2, ge=1, description="Per-device training batch size (rows).")
    gradient_accumulation_steps: int = Field(
        4,
        ge=1,
        description="Steps to accumulate before an optimiser step; effective batch = "
        "batch_size x this x number of processes.",
    )
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training rows.")
    max_steps: int = Field(
        -1, description="If > 0, stop after this many optimiser steps (overrides num_train_epochs)."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Fraction of steps for linear learning-rate warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: LrScheduler = Field(
        "linear",
        description="Learning-rate schedule after warm-up: linear, cosine, cosine_with_restarts, "
        "polynomial, constant, constant_with_warmup or inverse_sqrt.",
    )
    seed: int = Field(42, description="Seed for the data split, shuffling and LoRA init.")
    gradient_checkpointing: Literal["auto", "on", "off", "offload"] = Field(
        "auto",
        description="Recompute activations in the backward pass (less memory, ~30% slower). "
        "`auto`: off when the estimated peak memory without it fits the free GPU memory with a "
        "margin, else on (decision in the log and metrics.json; an out-of-memory error retries "
        "once with it on). `offload`: Unsloth's variant that parks activations in host memory. "
        "true/false mean on/off.",
    )
    packing: bool = Field(
        False,
        description="Pack several short rows into one sequence "
        "(padding-free, position ids reset per row).",
    )
    train_on_responses_only: bool = Field(
        True, description="Compute the loss on response tokens only (prompt tokens masked)."
    )
    fp16: bool = Field(
        False,
        description="Mixed precision fp16: CUDA only (an error on a CPU). Exclusive with bf16.",
    )
    bf16: bool = Field(
        False,
        description="Mixed precision bf16: CUDA GPUs with bf16 (Ampere or newer) and CPUs.",
    )
    precision: Literal["default", "fp8"] = Field(
        "default",
        description="Precision of the frozen base weights. `default`: the training dtype "
        "(bf16/fp16/fp32 as set above). `fp8`: stored and multiplied in FP8 on the GPU's "
        "tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell; refused elsewhere), "
        "LoRA weights and optimizer state in fp32, everything else in bf16; needs bf16: true, "
        "runs on the hf backend (`auto` picks it).",
    )

    # -- logging / checkpoints ---------------------------------------------------------------
    output_dir: str = Field(
        "./outputs",
        description="Run folder: checkpoints, final_model/, metrics.json, loss_curve.png.",
    )
    save_steps: int = Field(500, ge=1, description="Save a checkpoint every N optimiser steps.")
    logging_steps: int = Field(10, ge=1, description="Log the training loss every N steps.")
    eval_steps: int = Field(100, ge=1, description="Evaluate on the held-out rows every N steps.")
    use_wandb: bool = Field(
        False, description="Report to Weights & Biases (needs `wandb` installed and logged in)."
    )
    wandb_project: str | None = Field(None, description="W&B project (with use_wandb).")
    wandb_run_name: str | None = Field(None, description="W&B run name (with use_wandb).")

    # -- data and prompts --------------------------------------------------------------------
    prompt_template: str | None = Field(
        None,
        description="Python format string with {instruction}, {response} and any {field} from "
        "the row or template_vars. None: use the tokenizer's chat template (what vLLM's chat "
        "endpoint sends at serving time).",
    )
    system_prompt: str | None = Field(
        None, description="System message prepended to every chat-formatted row that has none."
    )
    template_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Values for extra {placeholders} in prompt_template, "
        "e.g. {domain: 医疗}. A row's own field of the same name wins.",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Map your column names onto instruction/input/response, e.g. "
        "{question: instruction, answer: response}.",
    )

    # -- publish -----------------------------------------------------------------------------
    adapter_name: str | None = Field(
        None,
        description="Publish the trained adapter under this registry name (needs registry_dir).",
    )
    registry_dir: str | None = Field(
        None,
        description="Registry folder to publish into "
        "(default: $AGENT_FINETUNE_REGISTRY when adapter_name is set).",
    )

    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig,
        description="After publishing: {policy: always | if_better | never, eval_data, "
        "metric: loglik | f1 | exact, min_delta, server, max_tokens}. if_better promotes only "
        "when the new version beats the live one on eval_data (offline with PEFT when no "
        "server).",
    )

    replay: ReplayConfig = Field(
        default_factory=ReplayConfig,
        description="Replay guard against forgetting: {ratio, max_new_tokens, prompts}. "
        "ratio > 0 mixes ratio x (training rows) of the base model's own answers to general "
        "prompts into training (generated once per base model and cached under "
        "~/.cache/agent-finetune/replay). Off by default; the shipped real-model config "
        "sets ratio 1.0.",
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _bool_checkpointing(cls, v: Any) -> Any:
        # YAML files written before the policy say true/false.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> FineTuningConfig:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are both true; choose one (set the other to false)")
        if self.precision == "fp8":
            if not self.bf16:
                raise ValueError(
                    "precision: fp8 computes everything but the base projections in bf16; "
                    "set bf16: true (and fp16: false)"
                )
            if self.load_in_4bit:
                raise ValueError(
                    "precision: fp8 and load_in_4bit both quantize the base weights; choose one"
                )
            if self.backend == "unsloth":
                raise ValueError(
                    "precision: fp8 runs on the hf backend (Unsloth's fused LoRA kernels read "
                    "the base weights in bf16); set backend: hf or auto"
                )
        bad = unservable_modules(self.target_modules)
        if bad:
            raise ValueError(
                f"target_modules contains {bad}: vLLM's LoRA path cannot serve them (no "
                f"embeddings or lm_head); use a subset of {sorted(SERVABLE_MODULES)}"
            )
        if self.use_wandb and not self.wandb_project:
            raise ValueError("use_wandb is true but wandb_project is empty; set wandb_project")
        return self

    @property
    def publish_registry(self) -> str | None:
        """Where to publish, or None when not publishing."""
        if not self.adapter_name:
            return None
        return self.registry_dir or os.environ.get("AGENT_FINETUNE_REGISTRY")

    # -- YAML --------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> FineTuningConfig:
        """Load a YAML file; ``overrides`` win over the file's values."""
        p = Path(path)
        try:
            raw = yaml.safe_load(read_text_file(p, "config file")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of field: value, got {type(raw).__name__}")
        return cls.from_dict({**raw, **overrides}, source=str(p))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> FineTuningConfig:
        """Validate a dict, turning pydantic errors into one ConfigError that names the source."""
        try:
            return cls(**data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, source)) from None

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        return p


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """The text of a user's UTF-8 file (a leading BOM dropped), or a ConfigError that names
    ``what`` (``"config file"``), the path and the fix."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {p} is a folder; pass a file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot read it: {e.strerror or e}") from None


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <field>: <message> (got <value>)`` plus a suggestion."""
    lines = []
    fields = list(FineTuningConfig.model_fields)
    for err in error.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            sections: dict[str, type[BaseModel]] = {
                "promotion": PromotionConfig,
                "replay": ReplayConfig,
            }
            nested = sections.get(str(err["loc"][0]))
            known = list(nested.model_fields) if nested and len(err["loc"]) > 1 else fields
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            fix = f"; did you mean {hint[0]!r}?" if hint else ""
            fix += " (every field: `agent-finetune train --help`)"
            lines.append(f"{source}: unknown key {loc!r}{fix}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if loc != "(root)" else ""
            lines.append(f"{source}: {loc}: {msg}{got}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The configuration reference table for README.md (kept in sync by a test)."""
    rows = ["| field | default | description |", "| --- | --- | --- |"]
    for name, info in FineTuningConfig.model_fields.items():
        default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
        if isinstance(default, BaseModel):
            default = default.model_dump()
        text = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{default!r}` | {text} |".replace("`None`", "`null`"))
    return "\n".join(rows)


if __name__ == "__main__":  # python -m agent_finetune.training.config > reference table
    print(reference_markdown())
