"""`agent-finetune capture start|stop|status` and `dataset build`: production traffic and
its feedback, captured per adapter name, become a chat dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent_finetune.cli.output import emit_json, print_table
from agent_finetune.errors import CaptureError, RegistryError
from agent_finetune.registry import ENV_REGISTRY, Registry
from agent_finetune.registry.capture import (
    CaptureSettings,
    capture_dir,
    parse_age,
    parse_size,
    read_capture,
    read_settings,
    segments,
    write_settings,
)
from agent_finetune.server_client import ServerClient, add_server_options

CAPTURE_HELP = """\
Capture sampled chat completions of NAME (and the feedback agents post for them) on every
server that watches the registry. Off by default; the settings live in the registry
(<registry>/NAME/capture/settings.json), so every server agrees within one resync.

  capture start NAME [--sample 0.2] [--max-bytes 1G] [--max-age 30d] [--redact mod:func]
  capture stop NAME                    stop capturing (what was captured stays)
  capture status [NAME] [--json]       settings, exchanges, feedback, bytes, segments

Each server appends to its own rotated segments (<registry>/NAME/capture/<server>.NNNNNN.jsonl)
from a writer thread, never on the request's path; e-mail addresses, phone and card numbers
are redacted before anything is written, then --redact (a `str -> str` function) runs.
Oldest segments are deleted past --max-bytes or --max-age. Feedback: POST
/v1/adapters/NAME/feedback {"id": <response id>, "score": -1..1, "correction": "..."}.
A server's drop counters: `capture status --server URL` (GET /v1/adapters "capture") and
its /metrics (agent_finetune_capture_dropped).
"""


def _registry(args: argparse.Namespace) -> Registry:
    reg = Registry.from_env(args.registry)
    if not reg.root.is_dir():
        raise RegistryError(
            f"registry {reg.root} does not exist; check --registry / ${ENV_REGISTRY}"
        )
    return reg


def cmd_capture_start(args: argparse.Namespace) -> int:
    reg = _registry(args)
    reg.require_name(args.name)
    old = read_settings(reg.name_dir(args.name)) or CaptureSettings()
    settings = write_settings(
        reg.name_dir(args.name),
        CaptureSettings(
            enabled=True,
            sample=args.sample if args.sample is not None else old.sample,
            max_bytes=parse_size(args.max_bytes) if args.max_bytes else old.max_bytes,
            max_age_s=parse_age(args.max_age) if args.max_age else old.max_age_s,
            redact=args.redact if args.redact is not None else old.redact,
        ),
    )
    reg.log_event(args.name, "capture_start", **_fields(settings))
    if args.json:
        emit_json(settings.as_dict())
    else:
        print(
            f"{args.name}: capturing {settings.sample:.0%} of chat completions "
            f"(max {_size(settings.max_bytes)}, {settings.max_age_s / 86400:g} days)"
        )
    return 0


def cmd_capture_stop(args: argparse.Namespace) -> int:
    reg = _registry(args)
    reg.require_name(args.name)
    old = read_settings(reg.name_dir(args.name))
    if old is None or not old.enabled:
        print(f"{args.name}: capture is not on")
        return 0
    settings = write_settings(
        reg.name_dir(args.name), CaptureSettings(**{**old.as_dict(), "enabled": False})
    )
    reg.log_event(args.name, "capture_stop", **_fields(settings))
    kept = capture_dir(reg.name_dir(args.name))
    print(f"{args.name}: capture stopped (captured data kept in {kept})")
    return 0


def _fields(s: CaptureSettings) -> dict[str, Any]:
    return {k: v for k, v in s.as_dict().items() if k != "updated"}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def capture_status(reg: Registry, name: str) -> dict[str, Any]:
    """One name's capture settings and what its folder holds."""
    name_dir = reg.name_dir(name)
    try:
        found = read_settings(name_dir)
        settings, problem = (found.as_dict() if found else None), None
    except CaptureError as e:
        settings, problem = None, str(e)
    segs = segments(capture_dir(name_dir))
    log = read_capture(name_dir)
    rated = sum(1 for _, f in log.joined() if f is not None)
    return {
        "name": name,
        "settings": settings,
        "error": problem,
        "exchanges": len(log.exchanges),
        "rated": rated,
        "corrections": sum(1 for f in log.feedback.values() if f.get("correction")),
        "feedback": len(log.feedback),
        "bytes": sum(s.size for s in segs),
        "segments": len(segs),
        "replicas": len({s.replica for s in segs}),
        "skipped_lines": log.skipped,
    }


def _server_capture(args: argparse.Namespace) -> dict[str, Any] | None:
    """The server's capture counters (written, queued, dropped by reason), or None."""
    if not args.server:
        return None
    with ServerClient(args.server, api_key=args.api_key, timeout=10) as client:
        found = client.adapters().get("capture")
    return found if isinstance(found, dict) else {"error": "this server does not capture"}


def cmd_capture_status(args: argparse.Namespace) -> int:
    reg = _registry(args)
    names = [args.name] if args.name else reg.names()
    if args.name:
        reg.require_name(args.name)
    found = [capture_status(reg, n) for n in names]
    found = [f for f in found if args.name or f["settings"] or f["segments"]]
    server = _server_capture(args)
    if args.json:
        emit_json({"names": found, **({"server": server} if server is not None else {})})
        return 0
    if server is not None:
        print(
            f"server {args.server}: written {server.get('written', {})}, queued "
            f"{server.get('queued', 0)}, dropped {server.get('dropped', {}) or 'none'}"
            + (f", errors {server['errors']}" if server.get("errors") else "")
        )
    if not found:
        print("no name captures (agent-finetune capture start NAME)")
        return 0
    rows = []
    for f in found:
        s = f["settings"] or {}
        state = "error" if f["error"] else ("on" if s.get("enabled") else "off")
        sample = f"{s['sample']:.0%}" if s else ""
        rows.append(
            (
                f["name"],
                state,
                sample,
                f["exchanges"],
                f["rated"],
                f["corrections"],
                _size(f["bytes"]),
                f["segments"],
                f["replicas"],
                f["skipped_lines"],
            )
        )
    headers = [
        "NAME",
        "CAPTURE",
        "SAMPLE",
        "EXCHANGES",
        "RATED",
        "CORRECTIONS",
        "BYTES",
        "SEGMENTS",
        "SERVERS",
        "SKIPPED",
    ]
    print_table(rows, headers)
    for f in found:
        if f["error"]:
            print(f"{f['name']}: {f['error']}")
    if server is None:
        print("a server's drop counters: capture status --server URL, or its /metrics")
    return 0


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from agent_finetune.training.capture_dataset import build_rows, since_epoch, write_dataset

    reg = _registry(args)
    reg.require_name(args.name)
    since_s = parse_age(args.since) if args.since else None
    built = build_rows(
        reg.name_dir(args.name),
        since=since_epoch(since_s),
        min_score=args.min_score,
        include_corrections=args.include_corrections,
        heldout_share=args.heldout_share,
    )
    provenance = write_dataset(
        built,
        Path(args.out),
        {
            "name": args.name,
            "since_s": since_s,
            "min_score": args.min_score,
            "include_corrections": args.include_corrections,
            "heldout_share": args.heldout_share,
        },
    )
    if args.json:
        emit_json(provenance)
        return 0
    report_dataset(provenance)
    return 0


def report_dataset(p: dict[str, Any]) -> None:
    kept = ", ".join(f"{k} {v}" for k, v in sorted(p["kept"].items())) or "none"
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(p["dropped"].items())) or "none"
    print(f"dataset: {p['train']['rows']} train rows -> {p['train']['path']}")
    print(f"         {p['heldout']['rows']} held-out rows -> {p['heldout']['path']}")
    print(
        f"         conversations: {p['conversations']['train']} train, "
        f"{p['conversations']['heldout']} held-out"
    )
    print(f"         kept: {kept}; dropped: {dropped}")
    print(
        f"         from {len(p['segments'])} segment(s), versions "
        f"{', '.join(sorted(p['versions'])) or 'none'}; {p['skipped_lines']} line(s) skipped"
    )


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--registry", default=None, help=f"registry folder (default: ${ENV_REGISTRY})")


def add_capture_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "capture",
        help="capture sampled production chats and feedback per adapter name",
        description=CAPTURE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = p.add_subparsers(dest="capture_command", required=True, metavar="ACTION")
    q = csub.add_parser("start", help="start (or re-set) capture of NAME")
    _common(q)
    q.set_defaults(func=cmd_capture_start)
    q.add_argument("name")
    q.add_argument("--sample", type=float, help="share of NAME's chat completions, 0-1 (default 1)")
    q.add_argument("--max-bytes", help="disk bound of NAME's capture folder: 500M, 1G (default 1G)")
    q.add_argument("--max-age", help="delete segments older than this: 12h, 30d (default 30d)")
    q.add_argument("--redact", help="extra redaction: module:function (str -> str)")
    q = csub.add_parser("stop", help="stop capturing NAME (captured data stays)")
    _common(q)
    q.set_defaults(func=cmd_capture_stop)
    q.add_argument("name")
    q = csub.add_parser("status", help="capture settings and counts per name")
    _common(q)
    q.set_defaults(func=cmd_capture_status)
    q.add_argument("name", nargs="?")
    add_server_options(q, purpose="a server to read its drop counters from (none: registry only)")

    p = sub.add_parser("dataset", help="build a training dataset from captured traffic")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    q = dsub.add_parser(
        "build",
        help="chat dataset from NAME's captured exchanges and feedback",
        description="Good-rated answers as they were; corrected ones (--include-corrections) "
        "with the correction; negative ones without a correction and unrated ones left out; "
        "exact and near duplicates removed; split into train and held-out by conversation. "
        "Writes FILE, FILE's .heldout.jsonl and .provenance.json beside it.",
    )
    _common(q)
    q.set_defaults(func=cmd_dataset_build)
    q.add_argument("name")
    q.add_argument("--out", required=True, help="train rows (JSONL, chat format)")
    q.add_argument("--since", help="only exchanges of the last: 12h, 7d (default: all)")
    q.add_argument("--min-score", type=float, default=0.5, help="keep answers rated >= (0.5)")
    q.add_argument("--include-corrections", action="store_true", help="train on corrections")
    q.add_argument("--heldout-share", type=float, default=0.1, help="conversations held out (0.1)")
