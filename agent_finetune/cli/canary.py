"""`agent-finetune canary start|status|promote|abort`: a share of real traffic, guarded."""

from __future__ import annotations

import argparse
from typing import Any

from agent_finetune.cli.output import emit_json, print_table
from agent_finetune.errors import InvalidCanaryError, RegistryError
from agent_finetune.registry import ENV_REGISTRY, Registry
from agent_finetune.registry.canary_state import (
    Guards,
    finish_canary,
    parse_duration,
    read_canary,
    start_canary,
)
from agent_finetune.server_client import ServerClient, add_server_options

CANARY_HELP = """\
Send a share of NAME's traffic to a candidate version on every server that watches the
registry, watch it, and roll back by itself when it misbehaves.

  canary start NAME@vNNNN --weight 10 [guards] [--duration 30m] [--auto-promote]
  canary status NAME [--server URL]     registry state, plus the server's live counters
  canary promote NAME                   make the candidate current, end the canary
  canary abort NAME                     100% back to the current version

The canary is a file beside `current` (<registry>/NAME/canary), written atomically and
logged in history (canary_start, canary_abort, canary_promote). Requests for NAME carrying
the OpenAI `user` field or an `X-Session-ID` header always land on the same side; others are
split at random. Every response names the version that answered (`model`).

Guards, judged continuously on the sum over every server (each writes its counters to
<registry>/NAME/rollout/counts/); the first server whose sum trips aborts the canary for all
(history records `canary_abort` with the reason):
  --max-error-rate      candidate's share of failed answers: HTTP 5xx, an error event inside
                        a 200 stream, a 404 of the candidate, a transient refusal to load it
                        (after --min-requests candidate requests, all servers)
  --max-latency-ratio   candidate's median latency per output token / the current version's
                        (after --min-requests on both)
  --max-negative-feedback
                        share of negative scores agents posted to
                        POST /v1/adapters/NAME/feedback {"id": <response id>, "score": -1..1}
                        for answers the servers issued during the canary (one score per
                        answer: a later one replaces it; any server accepts any server's
                        answer id; other ids are refused with 404) (after --min-feedback)
With --auto-promote, once --duration has passed since the start, no guard tripped and the
servers together saw at least --min-requests candidate requests, it is promoted, if current
is still the version it started from.

Operators win: `promote`, `rollback`, `publish` (made current) and a gate decision about the
candidate end a running canary first (history: canary_abort "superseded ... operators win");
a canary never moves current away from a version an operator chose.
"""


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.from_env(args.registry)


def cmd_start(args: argparse.Namespace) -> int:
    from agent_finetune.cli.eval import parse_target

    name, version = parse_target(args.target)
    if version is None:
        raise RegistryError(f"canary start {args.target}: name the version, NAME@vNNNN")
    try:
        guards = Guards(
            min_requests=args.min_requests,
            max_error_rate=args.max_error_rate,
            max_latency_ratio=args.max_latency_ratio,
            max_negative_feedback=args.max_negative_feedback,
            min_feedback=args.min_feedback,
            duration_s=parse_duration(args.duration),
        )
    except InvalidCanaryError as e:
        raise InvalidCanaryError(f"canary start: {e}") from None
    canary = start_canary(
        _registry(args),
        name,
        version,
        weight=args.weight,
        guards=guards,
        auto_promote=args.auto_promote,
        reason=args.reason,
    )
    if args.json:
        emit_json(canary.as_dict())
    else:
        print(
            f"{name}: canary of {version} on {canary.weight:g}% of traffic "
            f"(current {canary.baseline}); "
            + (
                f"auto-promote after {guards.duration_s:g}s green"
                if args.auto_promote
                else f"promote with `agent-finetune canary promote {name}`"
            )
        )
    return 0


def _server_status(server: str, api_key: str | None, name: str) -> dict[str, Any] | None:
    """The canary counters of ``name`` in the server's ``GET /v1/adapters``, if it runs one."""
    with ServerClient(server, api_key=api_key, timeout=10) as client:
        data = client.adapters()
    found = ((data.get("canary") or {}).get("names") or {}).get(name)
    return dict(found) if isinstance(found, dict) else None


def cmd_status(args: argparse.Namespace) -> int:
    reg = _registry(args)
    reg.require_name(args.name)
    canary = read_canary(reg, args.name)
    live = _server_status(args.server, args.api_key, args.name) if args.server else None
    last = next(
        (e for e in reversed(reg.history(args.name)) if str(e.get("action")).startswith("canary")),
        None,
    )
    if args.json:
        emit_json(
            {
                "name": args.name,
                "current": reg.current(args.name),
                "canary": canary.as_dict() if canary else None,
                "elapsed_s": canary.elapsed_s() if canary else None,
                "server": live,
                "last_event": last,
            }
        )
        return 0
    if canary is None:
        print(f"{args.name}: no canary running (current {reg.current(args.name)})")
        if last:
            what = f"{last.get('action')} {last.get('to')}: {last.get('reason')}"
            print(f"last: {last.get('ts')} {what}")
        return 0
    g = canary.guards
    print(
        f"{args.name}: canary {canary.version} on {canary.weight:g}% vs current "
        f"{canary.baseline}, running {canary.elapsed_s():.0f}s of {g.duration_s:g}s"
        f"{' (auto-promote)' if canary.auto_promote else ''}"
    )
    print(
        f"guards: error rate <= {g.max_error_rate:g}, latency ratio <= {g.max_latency_ratio:g}, "
        f"negative feedback <= {g.max_negative_feedback:g} "
        f"(after {g.min_requests} requests / {g.min_feedback} scores)"
    )
    if live:
        rows = [
            (
                v,
                s.get("role"),
                s.get("requests"),
                s.get("errors"),
                _ms(s.get("p50_token_s")),
                _ms(s.get("p95_token_s")),
                s.get("feedback"),
                _fmt(s.get("negative_rate")),
            )
            for v, s in (live.get("versions") or {}).items()
        ]
        print_table(
            rows,
            [
                "VERSION",
                "ROLE",
                "REQUESTS",
                "ERRORS",
                "P50 MS/TOK",
                "P95 MS/TOK",
                "FEEDBACK",
                "NEG",
            ],
        )
        print(f"counted over {live.get('replicas', 1)} server(s); verdict: {live.get('verdict')}")
    return 0


def _ms(seconds: Any) -> str:
    return f"{seconds * 1000:.2f}" if isinstance(seconds, float) else ""


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "" if value is None else str(value)


def _finish(args: argparse.Namespace, outcome: str) -> int:
    reg = _registry(args)
    reason = args.reason or f"by hand ({outcome})"
    ended = finish_canary(
        reg, args.name, "promote" if outcome == "promote" else "abort", reason=reason
    )
    if ended is None:
        raise RegistryError(f"{args.name} has no canary running")
    result = {
        "name": args.name,
        "outcome": outcome,
        "version": ended.version,
        "current": reg.current(args.name),
    }
    if args.json:
        emit_json(result)
    elif outcome == "promote":
        print(f"{args.name}: canary {ended.version} promoted; current -> {result['current']}")
    else:
        print(f"{args.name}: canary {ended.version} aborted; 100% on {result['current']}")
    return 0


def add_canary_parser(sub: Any) -> None:
    p = sub.add_parser(
        "canary",
        help="route a share of traffic to a candidate version; roll back automatically",
        description=CANARY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = p.add_subparsers(dest="canary_command", required=True, metavar="ACTION")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = csub.add_parser(name, help=help, description=help)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.add_argument(
            "--registry", default=None, help=f"registry folder (default: ${ENV_REGISTRY})"
        )
        return q

    d = Guards()
    q = add("start", "start a canary of NAME@vNNNN")
    q.set_defaults(func=cmd_start)
    q.add_argument("target", metavar="NAME@vNNNN")
    q.add_argument("--weight", type=float, required=True, help="percent of NAME's traffic (0-100]")
    q.add_argument(
        "--min-requests",
        type=int,
        default=d.min_requests,
        help=f"candidate requests before the request guards are judged ({d.min_requests})",
    )
    q.add_argument(
        "--max-error-rate",
        type=float,
        default=d.max_error_rate,
        help=f"abort above this share of failed candidate answers (default {d.max_error_rate})",
    )
    q.add_argument(
        "--max-latency-ratio",
        type=float,
        default=d.max_latency_ratio,
        help=f"abort when the candidate's median latency per output token / current's exceeds "
        f"this (default {d.max_latency_ratio})",
    )
    q.add_argument(
        "--max-negative-feedback",
        type=float,
        default=d.max_negative_feedback,
        help=f"abort above this share of negative feedback scores "
        f"(default {d.max_negative_feedback})",
    )
    q.add_argument(
        "--min-feedback",
        type=int,
        default=d.min_feedback,
        help=f"feedback scores before the feedback guard is judged ({d.min_feedback})",
    )
    q.add_argument(
        "--duration",
        default="30m",
        help="how long it must stay green before promotion: 90s, 30m, 2h (default 30m)",
    )
    q.add_argument(
        "--auto-promote", action="store_true", help="promote by itself once --duration passed green"
    )
    q.add_argument("--reason", help="recorded in history.jsonl")

    q = add("status", "show NAME's canary (and a server's live counters with --server)")
    q.set_defaults(func=cmd_status)
    q.add_argument("name")
    add_server_options(q, purpose="a server to read live counters from (none: registry only)")

    q = add("promote", "make the canary's version current and end the canary")
    q.set_defaults(func=lambda a: _finish(a, "promote"))
    q.add_argument("name")
    q.add_argument("--reason", help="recorded in history.jsonl")

    q = add("abort", "end the canary: all traffic back to the current version")
    q.set_defaults(func=lambda a: _finish(a, "abort"))
    q.add_argument("name")
    q.add_argument("--reason", help="recorded in history.jsonl")
