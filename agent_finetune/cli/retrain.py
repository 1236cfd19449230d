"""`agent-finetune retrain NAME`: the flywheel's one command.

1. build the dataset from NAME's captured exchanges and feedback (``dataset build``);
2. merge its train rows with the live version's own training data (the file its manifest
   records, checked by sha256) and any ``--data`` files;
3. held-out rows: the captured held-out conversations plus the live version's held-out
   data (its config's ``promotion.eval_data``);
4. train from the live version's config (published, not current);
5. gate it against live on those held-out rows: promote only if better, or, with
   ``--canary W``, start a guarded canary of W% that promotes itself when it stays green.

A refusal exits 3, as ``promote --if-better`` does. Every step prints what it did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent_finetune.cli.capture import report_dataset
from agent_finetune.cli.output import emit_json
from agent_finetune.errors import ConfigError, DataError, GateRefusedError, RegistryError
from agent_finetune.registry import ENV_REGISTRY, Registry
from agent_finetune.registry.capture import parse_age

RETRAIN_HELP = """\
Retrain NAME from production: captured exchanges rated at least --min-score, corrected
answers (their corrections), merged with the live version's own training data (recorded in
its manifest) and --data files; trained from the live version's config; evaluated against
the live version on the captured held-out conversations plus the live version's held-out
data; promoted only if better (exit 3 if not), or canaried with --canary PERCENT (guards on,
auto-promote after --canary-duration). Run it from cron or a systemd timer with --yes.
"""


def _say(args: argparse.Namespace, step: str, text: str) -> None:
    if not args.json:
        print(f"[{step}] {text}", flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _live_rows(args: argparse.Namespace, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The live version's training rows as chat rows (empty with a warning when the file
    its manifest records is gone or changed and ``--data`` carries the load)."""
    from agent_finetune.training.data import load_dataset_file

    recorded = manifest.get("dataset") or {}
    config = manifest.get("training_config") or {}
    path = Path(str(recorded.get("path") or ""))
    problem = None
    if not recorded.get("path"):
        problem = "its manifest records no training data"
    elif not path.is_file():
        problem = f"its training data {path} is gone"
    elif recorded.get("sha256") and _sha256(path) != recorded["sha256"]:
        problem = f"its training data {path} changed since it was trained (sha256 differs)"
    if problem is not None:
        if not args.data:
            raise DataError(f"the live version's {problem}; pass the data with --data FILE")
        _say(args, "merge", f"warning: {problem}; using --data only")
        return []
    data = load_dataset_file(
        path, field_map=config.get("field_map"), system_prompt=config.get("system_prompt")
    )
    return [{"messages": ex.messages} for ex in data.examples]


def _extra_rows(args: argparse.Namespace, config: dict[str, Any]) -> list[dict[str, Any]]:
    from agent_finetune.training.data import load_dataset_file

    rows: list[dict[str, Any]] = []
    for f in args.data or []:
        data = load_dataset_file(
            f, field_map=config.get("field_map"), system_prompt=config.get("system_prompt")
        )
        rows += [{"messages": ex.messages} for ex in data.examples]
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def _prepare(
    args: argparse.Namespace, reg: Registry, live: str, work: Path
) -> tuple[dict[str, Any], Path, Path, dict[str, Any]]:
    """Steps 1-3: (the live config, train file, held-out file, provenance)."""
    from agent_finetune.training.capture_dataset import (
        build_rows,
        merge_rows,
        since_epoch,
        write_dataset,
    )
    from agent_finetune.training.data import load_dataset_file

    manifest = reg.manifest(args.name, live)
    config = manifest.get("training_config")
    if not isinstance(config, dict):
        raise ConfigError(
            f"{args.name}@{live} records no training config in its manifest; retrain needs a "
            "live version published by `agent-finetune train`"
        )
    since_s = parse_age(args.since) if args.since else None
    built = build_rows(
        reg.name_dir(args.name),
        since=since_epoch(since_s),
        min_score=args.min_score,
        include_corrections=True,
        heldout_share=args.heldout_share,
    )
    settings = {"name": args.name, "since_s": since_s, "min_score": args.min_score}
    provenance = write_dataset(
        built,
        work / "captured.jsonl",
        {**settings, "include_corrections": True, "heldout_share": args.heldout_share},
    )
    if not args.json:
        report_dataset(provenance)
    live_rows, extra = _live_rows(args, manifest), _extra_rows(args, config)
    rows, merged = merge_rows([*live_rows, *extra], built.train, built.corrections)
    if not merged["captured_added"] and not args.data:
        raise DataError(
            f"nothing new to learn for {args.name}: {len(built.train)} captured train rows, "
            f"{merged['captured_known']} already in the live version's data; let capture run "
            "longer, lower --min-score, or pass --data"
        )
    train_file = _write_rows(work / "train.jsonl", rows)
    provenance["merge"] = dict(merged)
    _say(args, "merge", f"{len(live_rows)} live training rows + {len(extra)} from --data + "
         f"{merged['captured_added']} captured ({merged['base_replaced']} older rows replaced "
         f"by corrections, {merged['captured_known']} already known) -> {train_file}")  # fmt: skip
    live_heldout: list[dict[str, Any]] = []
    eval_data = (config.get("promotion") or {}).get("eval_data")
    if eval_data and Path(eval_data).is_file():
        data = load_dataset_file(
            eval_data, field_map=config.get("field_map"), system_prompt=config.get("system_prompt")
        )
        live_heldout = [{"messages": ex.messages} for ex in data.examples]
    heldout_file = _write_rows(work / "heldout.jsonl", [*built.heldout, *live_heldout])
    _say(args, "held-out", f"{len(built.heldout)} captured + {len(live_heldout)} of the live "
         f"version's held-out data ({eval_data or 'none recorded'}) -> {heldout_file}")  # fmt: skip
    return config, train_file, heldout_file, provenance


def _confirm(args: argparse.Namespace, live: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise RegistryError("retrain runs unattended only with --yes (it trains and may promote)")
    answer = input(f"train a new version of {args.name} and gate it against {live}? [y/N] ")
    if answer.strip().lower() not in {"y", "yes"}:
        raise RegistryError("retrain cancelled")


def cmd_retrain(args: argparse.Namespace) -> int:
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    reg = Registry.from_env(args.registry)
    reg.require_name(args.name)
    live = reg.current(args.name)
    if live is None:
        raise RegistryError(f"{args.name} has no live version; retrain improves a live one")
    if args.canary is not None and reg.canary_record(args.name) is not None:
        raise RegistryError(
            f"{args.name} already runs a canary; end it first (agent-finetune canary abort "
            f"{args.name}) or retrain without --canary"
        )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    work = Path(args.work or f".flywheel/{args.name}/{stamp}")
    work.mkdir(parents=True, exist_ok=True)
    _say(args, "dataset", f"{args.name}: live {live}; working in {work}")
    config_data, train_file, heldout_file, provenance = _prepare(args, reg, live, work)
    _confirm(args, live)
    promotion = {**(config_data.get("promotion") or {}), "policy": "never"}
    config = FineTuningConfig.from_dict(
        {
            **config_data,
            "output_dir": str(work / "run"),
            "adapter_name": args.name,
            "registry_dir": str(reg.root),
            "promotion": promotion,
        },
        source=f"{args.name}@{live} manifest training_config",
    )
    _say(args, "train", f"training from {live}'s config on {train_file} ({config.model_name})")
    result = train(config, train_file, publish_reason=f"retrain from captured traffic ({stamp})")
    if result.published is None:
        raise RegistryError("the retrained adapter was not published")
    version = result.published.version
    _say(args, "train", f"published {args.name}@{version} (not current)")
    reg.log_event(
        args.name,
        "retrain",
        **{"from": live, "to": version},
        data={k: provenance.get(k) for k in ("kept", "dropped", "merge", "versions")},
        segments=len(provenance.get("segments", [])),
        reason=f"trained from captured traffic in {work}",
    )
    outcome = _gate_step(args, reg, version, heldout_file, config.model_name, promotion)
    if args.json:
        emit_json({"version": version, "live": live, "dataset": provenance, **outcome})
    if not outcome["promoted"] and not outcome.get("canary"):
        raise GateRefusedError(f"{args.name}@{version} not promoted: {outcome['reason']}")
    return 0


def _gate_step(
    args: argparse.Namespace,
    reg: Registry,
    version: str,
    heldout_file: Path,
    base_model: str,
    promotion: dict[str, Any],
) -> dict[str, Any]:
    """Step 5: the gate on the held-out rows; promote, canary, or refuse."""
    from agent_finetune.registry.canary_state import Guards, parse_duration, start_canary
    from agent_finetune.training.data import load_dataset_file
    from agent_finetune.training.evaluate import Metric
    from agent_finetune.training.gate import decide, evaluate_versions, gate

    metric: Metric = args.metric or promotion.get("metric") or "loglik"
    min_delta = float(promotion.get("min_delta") or 0.0)
    server = args.server or promotion.get("server")
    heldout = load_dataset_file(heldout_file)
    if args.canary is None:
        result = gate(
            reg,
            args.name,
            version,
            heldout,
            metric=metric,
            min_delta=min_delta,
            min_rows=args.min_rows,
            server=server,
            base_model=None if server else base_model,
        )
        _say(args, "gate", f"{'promoted' if result.promoted else 'refused'}: {result.reason}")
        return {"promoted": result.promoted, "reason": result.reason, "gate": result.as_dict()}
    live = reg.current(args.name)
    assert live is not None
    if len(heldout.examples) < args.min_rows:
        raise DataError(
            f"{heldout_file} has {len(heldout.examples)} held-out rows; the gate needs "
            f"{args.min_rows} (lower --min-rows knowingly, or capture more)"
        )
    results = evaluate_versions(
        reg, args.name, [version, live], heldout, server=server,
        base_model=None if server else base_model, against=live, generate=metric != "loglik",
    )  # fmt: skip
    better, reason, comparison = decide(results, version, live, metric, min_delta, seed=0)
    entry = {"metric": metric, "comparison": comparison.as_dict() if comparison else None}
    if not better:
        reg.log_event(args.name, "gate", **{"from": live, "to": version}, **entry,
                      decision="refuse", reason=reason)  # fmt: skip
        _say(args, "gate", f"refused: {reason}")
        return {"promoted": False, "reason": reason, "gate": entry}
    guards = Guards(duration_s=parse_duration(args.canary_duration))
    start_canary(reg, args.name, version, weight=args.canary, guards=guards, auto_promote=True,
                 reason=f"retrain: gate passed ({reason})")  # fmt: skip
    _say(args, "canary", f"{args.name}@{version} gets {args.canary:g}% of traffic; it "
         f"promotes itself after {args.canary_duration} green (`canary status` shows the "
         "guards)")  # fmt: skip
    return {"promoted": False, "canary": args.canary, "reason": reason, "gate": entry}


def add_retrain_parser(sub: Any) -> None:
    p = sub.add_parser(
        "retrain",
        help="build a dataset from captured traffic, train, gate, promote (the flywheel)",
        description=RETRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_retrain)
    p.add_argument("name")
    p.add_argument("--data", action="append", help="extra training rows (repeatable)")
    p.add_argument("--canary", type=float, help="percent: canary the winner instead of promoting")
    p.add_argument("--canary-duration", default="30m", help="green time before auto-promote")
    p.add_argument("--yes", action="store_true", help="no question asked (cron, timers)")
    p.add_argument("--since", help="only exchanges of the last: 12h, 7d (default: all)")
    p.add_argument("--min-score", type=float, default=0.5, help="keep answers rated >= (0.5)")
    p.add_argument("--heldout-share", type=float, default=0.1, help="conversations held out")
    p.add_argument("--metric", choices=["loglik", "f1", "exact"], help="default: the config's")
    p.add_argument("--min-rows", type=int, default=10, help="held-out rows the gate needs (10)")
    p.add_argument("--server", help="evaluate through this server (default: offline with PEFT)")
    p.add_argument("--work", help="working folder (default .flywheel/NAME/<time>)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("--registry", default=None, help=f"registry folder (default: ${ENV_REGISTRY})")
