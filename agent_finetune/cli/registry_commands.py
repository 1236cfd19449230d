"""Registry commands: publish, list, show, history, promote, rollback, validate, gc, fsck."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_finetune.cli.eval import add_eval_options
from agent_finetune.cli.output import emit_json, print_table
from agent_finetune.errors import (
    AgentFinetuneError,
    GateRefusedError,
    NotFoundError,
    RegistryError,
)
from agent_finetune.registry import ENV_REGISTRY, Registry, VersionInfo, verify_folder
from agent_finetune.registry.adapter import load_base_config
from agent_finetune.registry.eval_records import latest_eval, read_evals
from agent_finetune.registry.fsck import fsck
from agent_finetune.registry.index import Listed, listing
from agent_finetune.registry.names import check_name, split_model
from agent_finetune.training.gate import MIN_ROWS

Handler = Callable[[argparse.Namespace], int]
# The one statement of what rollback means (README says the same).
ROLLBACK_RULE = (
    "undo the last pointer move: current goes back to the version that was current just "
    "before it (a second rollback undoes the first, like `cd -`); --to VERSION goes to any "
    "version. Already current: nothing changes and no history entry is written. A running "
    "canary ends first (operators win)"
)

PROMOTE_HELP = """\
Make NAME@vNNNN current (`promote NAME vNNNN` works too). A running canary of NAME ends
first (operators win; history records `canary_abort`).

With --if-better, first evaluate the candidate and the live version on --data (through
--server, or offline with PEFT without it; see `agent-finetune eval --help`), pair the rows
and promote only when the 95% bootstrap confidence interval of the mean gain on --metric lies
above --min-delta, on at least --min-rows rows with finite scores. The decision, with both
scores, the win rate and the interval, is written to history: in the `promote` entry of the
move, or as a `gate` entry for a refusal. The move happens only if the live version is still
current when the evaluation ends (else: error, nothing moves). A refusal prints the table
and exits with code 3.
"""


def _registry(args: argparse.Namespace, *, exists: bool = True) -> Registry:
    """The registry of ``--registry``/$AGENT_FINETUNE_REGISTRY; it must exist unless
    ``exists`` is False (publish creates it)."""
    reg = Registry.from_env(args.registry)
    if exists and not reg.root.is_dir():
        raise RegistryError(
            f"registry {reg.root} does not exist; check --registry / ${ENV_REGISTRY}, or "
            "create it by publishing (`agent-finetune publish NAME FOLDER` or `train`)"
        )
    return reg


def _metric(manifest: dict[str, Any], key: str) -> str:
    value = (manifest.get("metrics") or {}).get(key)
    return f"{value:.4f}" if isinstance(value, float) else ""


def _eval_summary(record: dict[str, Any] | None) -> str:
    """``loglik -0.512 f1 0.83 exact 0.60 (20 rows)`` from an eval record."""
    if not record:
        return ""
    m = record.get("metrics") or {}
    parts = [f"{k} {m[k]:.3f}" for k in ("loglik", "f1", "exact") if isinstance(m.get(k), float)]
    rows = (record.get("data") or {}).get("rows")
    return " ".join(parts) + (f" ({rows} rows)" if rows else "")


def _no_traceback(func: Handler) -> Handler:
    """Commands that read arbitrary user files: any OS or value error is a cause, not a crash."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except AgentFinetuneError:
            raise
        except (OSError, ValueError) as e:
            raise RegistryError(f"{args.command}: {type(e).__name__}: {e}") from e

    wrapper.__doc__ = func.__doc__
    return wrapper


@_no_traceback
def cmd_publish(args: argparse.Namespace) -> int:
    reg = _registry(args, exists=False)
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
        emit_json(
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
    # Every name: through the rebuildable index (fast at thousands of names).
    infos = reg.entries(args.name) if args.name else listing(reg)
    if args.json:
        emit_json(
            [
                {
                    "name": i.name,
                    "version": i.version,
                    "current": i.current,
                    "created_at": i.manifest.get("created_at"),
                    "base_model": i.manifest.get("base_model"),
                    "rank": (i.manifest.get("lora") or {}).get("r"),
                    "metrics": i.manifest.get("metrics"),
                    "eval": _latest_eval(reg, i),
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
                _eval_summary(_latest_eval(reg, i)),
            )
            for i in infos
        ],
        ["NAME", "VERSION", "CURRENT", "CREATED", "RANK", "EVAL LOSS", "LAST EVAL"],
    )
    return 0


def _latest_eval(reg: Registry, info: Listed | VersionInfo) -> dict[str, Any] | None:
    """The version's newest evaluation record: the index's copy when listed through it."""
    if isinstance(info, Listed):
        return info.eval
    return latest_eval(reg, info.name, info.version)


def cmd_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    pinned = split_model(args.name)
    name, version = pinned if pinned else (check_name(args.name), None)
    version = version or reg.current(name) or (reg.versions(name) or [""])[-1]
    if not version:
        raise NotFoundError(f"no adapter named {name!r} in {reg.root}")
    manifest = reg.manifest(name, version)
    evals = read_evals(reg, name, version)
    if args.json:
        emit_json({**manifest, "current": reg.current(name) == version, "evals": evals})
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
    for e in evals:
        data = e.get("data") or {}
        against = f" vs {e['against']}" if e.get("against") else ""
        print(
            f"  {'eval:':14} {e.get('ts')} {_eval_summary(e)}{against} on "
            f"{Path(str(data.get('path', '?'))).name} via {e.get('via')}"
        )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    reg = _registry(args)
    reg.require_name(args.name)
    entries = reg.history(args.name)
    if args.json:
        emit_json(entries)
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


def _report_move(args: argparse.Namespace, verb: str, before: str | None, now: str) -> None:
    if args.json:
        emit_json({"name": args.name, "from": before, "current": now, "changed": before != now})
    elif before == now:
        print(f"{args.name}: {now} is already current; nothing changed")
    else:
        print(f"{args.name}: {verb} {before} -> {now}")


def cmd_promote(args: argparse.Namespace) -> int:
    from agent_finetune.cli.eval import parse_target

    reg = _registry(args)
    name, version = parse_target(args.name, args.version)
    if version is None:
        raise RegistryError(f"promote {args.name}: which version? e.g. {args.name}@v0002")
    if args.if_better:
        return _gated_promote(args, reg, name, version)
    if args.data:
        raise RegistryError("--data is used only with --if-better; add --if-better to gate")
    args.name = name
    before = reg.current(name)
    version = reg.promote(name, version, reason=args.reason)
    _report_move(args, "promoted", before, version)
    return 0


def _gated_promote(args: argparse.Namespace, reg: Registry, name: str, version: str) -> int:
    from agent_finetune.cli.eval import print_gate
    from agent_finetune.training.gate import gate

    if not args.data:
        raise RegistryError("--if-better needs --data FILE (held-out rows to compare on)")
    result = gate(
        reg,
        name,
        version,
        args.data,
        metric=args.metric,
        min_delta=args.min_delta,
        min_rows=args.min_rows,
        server=args.server,
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        base_model=args.base_model,
    )
    if args.json:
        emit_json(result.as_dict())
    else:
        print_gate(result)
    if not result.promoted and result.reason != "already current":
        raise GateRefusedError(f"{name}@{version} not promoted: {result.reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    reg = _registry(args)
    before = reg.current(args.name)
    version = reg.rollback(args.name, to=args.to, reason=args.reason)
    _report_move(args, "rolled back", before, version)
    return 0


@_no_traceback
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
        emit_json(
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
        emit_json({"deleted": deleted, "dry_run": args.dry_run})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{args.name}: {verb} {', '.join(deleted) if deleted else 'nothing'}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    reg = _registry(args)
    report = fsck(reg, repair=args.repair)
    if args.json:
        emit_json(
            {
                "ok": report.ok,
                "findings": [
                    {"path": str(f.path), "problem": f.problem, "repaired": f.repaired}
                    for f in report.findings
                ],
            }
        )
    else:
        for f in report.findings:
            print(f"{f.path}: {f.problem}" + (f" [repaired: {f.repaired}]" if f.repaired else ""))
        left = len(report.remaining)
        if report.ok:
            print(f"{reg.root}: clean" if not report.findings else f"{reg.root}: repaired")
        else:
            hint = "" if args.repair else "; run with --repair to fix what can be fixed"
            print(f"{reg.root}: {left} problem(s) remain{hint}", file=sys.stderr)
    return 0 if report.ok else 1


def add_registry_parsers(sub: Any) -> None:
    """Add every registry command to the ``agent-finetune`` subparsers."""

    def add(name: str, func: Handler, help: str, registry: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if registry:
            p.add_argument(
                "--registry", default=None, help=f"registry folder (default: ${ENV_REGISTRY})"
            )
        return p

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
    p = add("promote", cmd_promote, "make a version current (with --if-better: only if it wins)")
    p.description = PROMOTE_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("name", metavar="NAME[@vNNNN]")
    p.add_argument("version", nargs="?", help="vNNNN (or write NAME@vNNNN)")
    p.add_argument("--reason", help="recorded in history.jsonl")
    p.add_argument(
        "--if-better",
        action="store_true",
        help="evaluate against the live version first; promote only if better (exit 3 if not)",
    )
    p.add_argument(
        "--min-delta",
        type=float,
        default=0.0,
        help="with --if-better: the 95%% CI of the mean gain must lie above this (default 0)",
    )
    p.add_argument(
        "--min-rows",
        type=int,
        default=MIN_ROWS,
        help=f"with --if-better: held-out rows needed to judge at all (default {MIN_ROWS})",
    )
    add_eval_options(p, data_required=False)
    p = add("rollback", cmd_rollback, ROLLBACK_RULE)
    p.add_argument("name")
    p.add_argument("--to", help="make this version current instead (go further back)")
    p.add_argument("--reason")
    p = add("validate", cmd_validate, "check that vLLM can serve an adapter folder", registry=False)
    p.add_argument("path")
    p.add_argument("--base-model", help="served model (local folder: shapes are checked too)")
    p.add_argument("--max-rank", type=int, default=None, help="server's --max-lora-rank")
    p = add("gc", cmd_gc, "delete old versions (never the current one nor the newest --keep)")
    p.add_argument("name")
    p.add_argument("--keep", type=int, default=3, help="newest versions to keep (default 3)")
    p.add_argument("--dry-run", action="store_true")
    p = add("fsck", cmd_fsck, "check the registry for crash leftovers and damage (exit 1 if any)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove stale staging/temp files, drop torn history lines, quarantine versions "
        "whose checksums broke, repoint a dangling current, rebuild the version high-water mark",
    )
