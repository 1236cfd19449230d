"""`agent-finetune train`: train a LoRA adapter and publish it."""

from __future__ import annotations

import argparse
import difflib
from typing import TYPE_CHECKING, Any

from agent_finetune.cli.output import emit_json
from agent_finetune.errors import ConfigError, GateRefusedError
from agent_finetune.registry.names import ENV_REGISTRY

if TYPE_CHECKING:
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import TrainResult


def cmd_train(args: argparse.Namespace) -> int:
    from agent_finetune.training.config import FineTuningConfig, read_text_file

    overrides = _overrides(args, list(FineTuningConfig.model_fields))
    if args.config:
        config = FineTuningConfig.from_yaml(args.config, **overrides)
    else:
        config = FineTuningConfig.from_dict(overrides, source="command line")
    template = (
        read_text_file(args.prompt_template, "--prompt-template") if args.prompt_template else None
    )

    from agent_finetune.training.train import train

    result = train(
        config, args.data, train_test_split=args.train_test_split, prompt_template=template
    )
    if not result.is_main:  # another rank of torchrun/accelerate: rank 0 reports
        return 0
    _report(args, config, result)
    gate = result.gate
    if gate is not None and not gate.promoted and gate.reason != "already current":
        raise GateRefusedError(
            f"{gate.name}@{gate.candidate} published, not promoted: {gate.reason}"
        )
    return 0


def _overrides(args: argparse.Namespace, fields: list[str]) -> dict[str, Any]:
    """Config values from ``--set KEY=VALUE`` (YAML values) and the flags that name a field."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora_r=8")
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(
                f"--set {item!r}: {key!r} is not a config field"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + " (every field: `agent-finetune train --help`)"
            )
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(
                f"--set {item!r}: {value!r} is not a YAML value ({problem}); quote text "
                f"that has YAML syntax in it: --set '{key}=\"...\"'"
            ) from None
    for key in ("model_name", "output_dir", "adapter_name", "registry_dir", "backend"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return overrides


def _report(args: argparse.Namespace, config: FineTuningConfig, result: TrainResult) -> None:
    """The run's summary on stdout: JSON with --json, else a few lines and the gate's table."""
    published = result.published
    summary = {
        "adapter_dir": str(result.adapter_dir),
        "backend": result.backend,
        "metrics": result.metrics,
        "published": f"{published.name}@{published.version}" if published else None,
        "gate": result.gate.as_dict() if result.gate else None,
    }
    if args.json:
        emit_json(summary)
        return
    m = result.metrics
    print(f"adapter: {result.adapter_dir}")
    print(
        f"backend: {result.backend}   train loss: {m['train_loss']:.4f}   "
        f"{m['train_tokens_per_second']} tok/s   peak memory: {m['peak_memory_gib']} GiB"
    )
    if m.get("eval_loss") is not None:
        print(f"eval loss: {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}")
    if published is not None:
        current = result.gate is None and config.promotion.policy == "always"
        print(f"published: {summary['published']}{' (current)' if current else ''}")
    if result.gate is not None:
        from agent_finetune.cli.eval import print_gate

        print_gate(result.gate)


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter (and publish it if the config names one)",
        description="train a LoRA adapter (and publish it if the config names one). Progress "
        "goes to stderr (one bar); the summary (or --json) to stdout; -v logs every trainer "
        "metric. The config's `promotion` block decides what happens after publishing: "
        "policy always (default) makes it current, never leaves it published only, "
        "if_better evaluates it against the live version on promotion.eval_data and "
        "promotes it only if it wins (else the table is printed and the command exits 3).",
        formatter_class=_FieldsEpilogFormatter,
    )
    p.set_defaults(func=cmd_train)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("--data", "-d", required=True, help="dataset: .json, .jsonl or .csv")
    p.add_argument("--model", dest="model_name", help="override model_name")
    p.add_argument("--output-dir", dest="output_dir", help="override output_dir")
    p.add_argument("--adapter-name", dest="adapter_name", help="publish under this name")
    p.add_argument(
        "--registry",
        dest="registry_dir",
        help=f"registry to publish into (default: ${ENV_REGISTRY})",
    )
    p.add_argument("--backend", choices=["auto", "unsloth", "hf"], help="override backend")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set lora_r=8 (repeatable)",
    )
    p.add_argument(
        "--train-test-split",
        type=float,
        default=0.1,
        help="fraction of rows held out for evaluation (default 0.1)",
    )
    p.add_argument(
        "--prompt-template", help="file holding a prompt template with {instruction} and {response}"
    )


class _FieldsEpilogFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends the config fields only when ``train --help`` is printed: building them imports
    pydantic, which every other command (and ``agent-finetune --help``) must not pay for."""

    def format_help(self) -> str:
        return super().format_help().rstrip("\n") + "\n\n" + _fields_epilog() + "\n"


def _fields_epilog() -> str:
    """Every config field (YAML key / --set KEY) and its default, for ``train --help``."""
    from agent_finetune.training.config import FineTuningConfig

    lines = ["config fields (YAML keys, or --set KEY=VALUE; README: Configuration reference):"]
    for name, info in FineTuningConfig.model_fields.items():
        default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
        lines.append(f"  {name:30} default {default!r}")
    return "\n".join(lines)
