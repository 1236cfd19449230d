"""`agent-finetune`: train, publish and manage adapter versions, serve and demo.

Exit codes: 0 success, 1 the operation failed (bad input, validation, server down),
2 usage error. Only this module turns exceptions into exit codes and friendly text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from agent_finetune._version import __version__
from agent_finetune.adapter import load_base_config
from agent_finetune.ask import add_ask_parser
from agent_finetune.demo import add_demo_parser
from agent_finetune.errors import AgentFinetuneError
from agent_finetune.registry import ENV_REGISTRY, Registry, verify_folder
from server_plugin.commands import add_serve_parser, add_sync_parser

Handler = Callable[[argparse.Namespace], int]


# -- output helpers -------------------------------------------------------------------------
def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A plain aligned table for people."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.from_env(args.registry)


def _metric(manifest: dict[str, Any], key: str) -> str:
    value = (manifest.get("metrics") or {}).get(key)
    return f"{value:.4f}" if isinstance(value, float) else ""


# -- commands -------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from agent_finetune.config import FineTuningConfig
    from agent_finetune.errors import ConfigError

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora_r=8")
        overrides[key.strip()] = yaml.safe_load(value)
    for key in ("model_name", "output_dir", "adapter_name", "registry_dir", "backend"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.config:
        config = FineTuningConfig.from_yaml(args.config, **overrides)
    else:
        config = FineTuningConfig.from_dict(overrides, source="command line")
    template = (
        Path(args.prompt_template).read_text(encoding="utf-8") if args.prompt_template else None
    )

    from agent_finetune.train import train

    result = train(
        config, args.data, train_test_split=args.train_test_split, prompt_template=template
    )
    summary = {
        "adapter_dir": str(result.adapter_dir),
        "backend": result.backend,
        "metrics": result.metrics,
        "published": f"{result.published.name}@{result.published.version}"
        if result.published
        else None,
    }
    if args.json:
        _emit_json(summary)
    else:
        m = result.metrics
        print(f"adapter: {result.adapter_dir}")
        print(
            f"backend: {result.backend}   train loss: {m['train_loss']:.4f}   "
            f"{m['train_tokens_per_second']} tok/s   peak memory: {m['peak_memory_gib']} GiB"
        )
        if m.get("eval_loss") is not None:
            print(f"eval loss: {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}")
        if summary["published"]:
            print(f"published: {summary['published']} (current)")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    reg = _registry(args)
    base_config = load_base_config(args.base_model) if args.base_model else None
    info = reg.publish(
        args.name,
        args.path,
        make_current=not args.no_promote,
        reason=args.reason,
        max_rank=args.max_rank,
        base_config=base_config,
        metadata={"imported_from": str(Path(args.path).absolute())},
    )
    if args.json:
        _emit_json(
            {
                "name": info.name,
                "version": info.version,
                "path": str(info.path),
                "current": info.current,
            }
        )
    else:
        state = "now current" if info.current else "not promoted"
        print(f"published {info.name}@{info.version} ({state}) -> {info.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    infos = reg.entries(args.name)
    if args.json:
        _emit_json(
            [
                {
                    "name": i.name,
                    "version": i.version,
                    "current": i.current,
                    "created_at": i.manifest.get("created_at"),
                    "base_model": i.manifest.get("base_model"),
                    "rank": (i.manifest.get("lora") or {}).get("r"),
                    "metrics": i.manifest.get("metrics"),
                }
                for i in infos
            ]
        )
        return 0
    if not infos:
        print(f"no adapters in {reg.root}")
        return 0
    print_table(
        [
            (
                i.name,
                i.version,
                "*" if i.current else "",
                i.manifest.get("created_at", "?"),
                (i.manifest.get("lora") or {}).get("r"),
                _metric(i.manifest, "eval_loss"),
            )
            for i in infos
        ],
        ["NAME", "VERSION", "CURRENT", "CREATED", "RANK", "EVAL LOSS"],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    name, _, version = args.name.partition("@")
    version = version or reg.current(name) or (reg.versions(name) or [""])[-1]
    if not version:
        from agent_finetune.errors import NotFoundError

        raise NotFoundError(f"no adapter named {name!r} in {reg.root}")
    manifest = reg.manifest(name, version)
    if args.json:
        _emit_json({**manifest, "current": reg.current(name) == version})
        return 0
    print(f"{name}@{version}{'  (current)' if reg.current(name) == version else ''}")
    lora = manifest.get("lora") or {}
    for label, value in [
        ("path", reg.version_dir(name, version)),
        ("created", manifest.get("created_at")),
        ("parent", manifest.get("parent")),
        ("base model", manifest.get("base_model")),
        (
            "LoRA",
            f"r={lora.get('r')} alpha={lora.get('alpha')} "
            f"modules={','.join(lora.get('target_modules') or [])}",
        ),
        ("dataset", (manifest.get("dataset") or {}).get("path")),
        ("metrics", json.dumps(manifest.get("metrics") or {})),
        ("tool version", manifest.get("tool_version")),
    ]:
        print(f"  {label + ':':14} {value}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    entries = _registry(args).history(args.name)
    if args.json:
        _emit_json(entries)
        return 0
    print_table(
        [
            (
                e.get("ts"),
                e.get("action"),
                e.get("from"),
                e.get("to"),
                e.get("user"),
                e.get("reason"),
            )
            for e in entries
        ],
        ["TIME", "ACTION", "FROM", "TO", "USER", "REASON"],
    )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    version = _registry(args).promote(args.name, args.version, reason=args.reason)
    print(
        json.dumps({"name": args.name, "current": version})
        if args.json
        else f"{args.name}: current -> {version}"
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    reg = _registry(args)
    before = reg.current(args.name)
    version = reg.rollback(args.name, to=args.to, reason=args.reason)
    print(
        json.dumps({"name": args.name, "from": before, "current": version})
        if args.json
        else f"{args.name}: rolled back {before} -> {version}"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    path = Path(args.path)
    base_config = load_base_config(args.base_model) if args.base_model else None
    report = verify_folder(
        path, max_rank=args.max_rank, base_model=args.base_model, base_config=base_config
    )
    if args.base_model and base_config is None:
        print(
            f"note: {args.base_model} is not a local model folder; shapes not checked",
            file=sys.stderr,
        )
    if args.json:
        _emit_json(
            {
                "path": str(path),
                "ok": report.ok,
                "rank": report.rank,
                "target_modules": report.target_modules,
                "problems": report.problems,
            }
        )
    elif report.ok:
        print(f"OK: {path} (r={report.rank}, modules={','.join(report.target_modules)})")
    else:
        print(f"INVALID: {path}")
        for p in report.problems:
            print(f"  - {p}")
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    deleted = _registry(args).gc(args.name, keep=args.keep, dry_run=args.dry_run)
    if args.json:
        _emit_json({"deleted": deleted, "dry_run": args.dry_run})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{args.name}: {verb} {', '.join(deleted) if deleted else 'nothing'}")
    return 0


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-finetune",
        description="Fine-tune LoRA adapters, publish them to a versioned registry, and hot-swap "
        "them into a running vLLM server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Handler, help: str, registry: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if registry:
            p.add_argument(
                "--registry", default=None, help=f"registry folder (default: ${ENV_REGISTRY})"
            )
        return p

    p = add(
        "train",
        cmd_train,
        "train a LoRA adapter (and publish it if the config names one)",
        registry=False,
    )
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

    p = add("publish", cmd_publish, "publish a PEFT LoRA folder as the next version")
    p.add_argument("name")
    p.add_argument("path", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--no-promote", action="store_true", help="publish without making it current")
    p.add_argument("--reason", help="recorded in history.jsonl")
    p.add_argument("--max-rank", type=int, help="refuse ranks above the server's --max-lora-rank")
    p.add_argument("--base-model", help="local base model folder to check tensor shapes against")

    p = add("list", cmd_list, "list adapters and versions")
    p.add_argument("name", nargs="?")
    p = add("show", cmd_show, "show a version's manifest (NAME or NAME@vNNNN)")
    p.add_argument("name")
    p = add("history", cmd_history, "show every pointer move of an adapter")
    p.add_argument("name")
    p = add("promote", cmd_promote, "make a version current")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason")
    p = add("rollback", cmd_rollback, "point current back to the previous version")
    p.add_argument("name")
    p.add_argument("--to", help="roll back to this version instead of the previous one")
    p.add_argument("--reason")
    p = add("validate", cmd_validate, "check that vLLM can serve an adapter folder", registry=False)
    p.add_argument("path")
    p.add_argument("--base-model", help="served model (local folder: shapes are checked too)")
    p.add_argument("--max-rank", type=int, default=None, help="server's --max-lora-rank")
    p = add("gc", cmd_gc, "delete old versions (never the current one nor the newest --keep)")
    p.add_argument("name")
    p.add_argument("--keep", type=int, default=3, help="newest versions to keep (default 3)")
    p.add_argument("--dry-run", action="store_true")

    add_serve_parser(sub)
    add_sync_parser(sub)
    add_demo_parser(sub)
    add_ask_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per HTTP request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code: int = args.func(args)
        return code
    except AgentFinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
