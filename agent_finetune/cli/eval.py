"""`agent-finetune eval`: score a version on held-out rows, against the live one."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from agent_finetune.cli.output import emit_json, print_table
from agent_finetune.errors import EvalError
from agent_finetune.registry import ENV_REGISTRY, Registry, split_model
from agent_finetune.server_client import add_server_options

if TYPE_CHECKING:
    from agent_finetune.training.evaluate import EvalResult
    from agent_finetune.training.gate import GateResult

EVAL_HELP = """\
Sends each row of a held-out dataset (the formats `train` reads) to NAME@vNNNN and to the
live version (--against, default NAME's current version) and prints, per metric, both means,
the mean paired gain, its 95% bootstrap confidence interval and the win rate.

Metrics (higher is better): exact (answer == reference), f1 (token F1; CJK characters are
tokens), loglik (mean log-probability per token of the reference answer, via vLLM's
prompt_logprobs: deterministic, no generation).

With --server the rows go through that server, rendered by its chat template, pinned to each
version (a running canary never interferes): what is measured is what will be served.
Without --server the versions are scored offline with PEFT on the base model, same rendering.
Each version's scores are appended to <registry>/NAME/evals.jsonl; `list` and `show` show them.
"""


def parse_target(target: str, version: str | None = None) -> tuple[str, str | None]:
    """``NAME@vNNNN`` (or ``NAME`` plus ``version``) -> (name, version or None)."""
    parsed = split_model(target)
    if parsed is not None:
        if version is not None and version != parsed[1]:
            raise EvalError(f"{target} and version {version} disagree; give one")
        return parsed
    if "@" in target:
        raise EvalError(f"{target!r}: expected NAME@vNNNN, e.g. support-bot@v0002")
    return target, version


def add_eval_options(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    """Options shared by `eval` and `promote --if-better`."""
    p.add_argument(
        "--data",
        required=data_required,
        help="held-out dataset: .json, .jsonl or .csv, same shapes as training data",
    )
    add_server_options(p, purpose="evaluate through this server (none: offline with PEFT)")
    p.add_argument(
        "--metric",
        choices=["loglik", "f1", "exact"],
        default="loglik",
        help="metric the decision uses (default loglik)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="answer length for exact/f1, as the agent sends it (default 128)",
    )
    p.add_argument(
        "--base-model", help="offline only: base model (default: the manifest's base model)"
    )


def print_results(
    results: dict[str, EvalResult], candidate: str, live: str | None, seed: int = 0
) -> None:
    """Per metric: candidate and live means, paired gain, CI and win rate."""
    from agent_finetune.training.evaluate import METRICS, compare_scores

    rows: list[tuple[Any, ...]] = []
    cand = results[candidate]
    for m in METRICS:
        if m not in cand.scores:
            continue  # offline gate on loglik: no answers generated
        if live is None or live not in results:
            rows.append((m, f"{cand.means()[m]:.4f}", "", "", "", ""))
            continue
        c = compare_scores(cand.scores[m], results[live].scores[m], metric=m, seed=seed)
        rows.append(
            (
                m,
                f"{c.candidate:.4f}",
                f"{c.live:.4f}",
                f"{c.delta:+.4f}",
                f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]",
                f"{c.win_rate:.0%} ({c.wins}/{c.ties}/{c.losses})",
            )
        )
    headers = [
        "METRIC",
        f"CANDIDATE {candidate}",
        f"LIVE {live or '-'}",
        "GAIN",
        "95% CI",
        "WIN RATE (W/T/L)",
    ]
    print(f"rows: {cand.rows}")
    print_table(rows, headers)


def print_gate(result: GateResult) -> None:
    if result.results:
        print_results(result.results, result.candidate, result.live)
    verdict = "PROMOTED" if result.promoted else "REFUSED"
    print(f"\n{verdict} {result.name}@{result.candidate}: {result.reason}")


def cmd_eval(args: argparse.Namespace) -> int:
    from agent_finetune.training.data import load_dataset_file
    from agent_finetune.training.evaluate import METRICS, compare_scores
    from agent_finetune.training.gate import evaluate_versions

    reg = Registry.from_env(args.registry)
    name, version = parse_target(args.target)
    if version is None:
        version = reg.current(name)
        if version is None:
            raise EvalError(f"{name} has no current version; name one: {name}@vNNNN")
    live: str | None
    if args.against:
        against_name, live = parse_target(args.against)
        if against_name != name:
            raise EvalError(f"--against {args.against}: compare versions of {name} only")
        live = live or reg.current(name)
    else:
        live = reg.current(name)
    if live == version:
        live = None
    dataset = load_dataset_file(args.data)
    versions = [version] + ([live] if live else [])
    results = evaluate_versions(
        reg,
        name,
        versions,
        dataset,
        server=args.server,
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        base_model=args.base_model,
        against=live,
    )
    if args.json:
        out: dict[str, Any] = {
            "name": name,
            "candidate": version,
            "live": live,
            "rows": len(dataset),
            "means": {v: r.means() for v, r in results.items()},
        }
        if live:
            out["comparison"] = {
                m: compare_scores(
                    results[version].scores[m], results[live].scores[m], metric=m
                ).as_dict()
                for m in METRICS
                if m in results[version].scores
            }
        emit_json(out)
    else:
        print_results(results, version, live)
    return 0


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="score a version on held-out data against the live version",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_eval)
    p.add_argument("target", metavar="NAME@vNNNN", help="version to evaluate (NAME: its current)")
    p.add_argument(
        "--against",
        metavar="NAME[@vNNNN]",
        help="version to compare with (default: NAME's current version)",
    )
    add_eval_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--registry", default=None, help=f"registry folder (default: ${ENV_REGISTRY})")
