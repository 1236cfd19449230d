"""`agent-finetune status --server URL [--server URL ...]`: do the replicas agree?

Reads each server's ``GET /v1/adapters`` (the plugin's status) and prints, per name and
replica, the version it serves, its state, its lag and its last error. Replicas that watch
one registry converge within a resync interval; the command waits up to ``--max-lag``
seconds for a disagreement to resolve and exits 1 when it outlives that (or a server
cannot be read), so a cron job or a deploy script can alert on it.

What a replica serves for a name: the live version; for a lazy name that is not loaded
(see ``AGENT_FINETUNE_PRELOAD``), the version it would load on the next request, its
``desired`` one. ``STAGED`` lists the versions the replica has loaded ahead of going live
(``AGENT_FINETUNE_MAX_STAGED``: promote and rollback to them are a repoint), and why: the
newest published version (``next``), a canary's candidate, the rollback target; ``!`` marks
one that failed to stage (its error is in ``--json``). The lag of a replica that does not
serve the newest desired version is the time since that version became current
(``desired_since`` in the servers' status; without it, since this command first saw the
disagreement).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent_finetune.cli.output import emit_json, print_table
from agent_finetune.errors import AgentFinetuneError
from agent_finetune.registry.names import server_root
from agent_finetune.server_client import ServerClient, add_server_options

Fetch = Callable[[str], dict[str, Any]]

DEFAULT_MAX_LAG_S = 10.0
POLL_S = 0.5


@dataclass
class Row:
    """One name on one replica."""

    name: str
    server: str
    desired: str | None
    live: str | None
    state: str
    serves: str | None
    lag_s: float
    error: str | None
    staged: list[dict[str, Any]] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        return self.lag_s > 0


def fetch_adapters(api_key: str | None, timeout: float = 10.0) -> Fetch:
    """``GET /v1/adapters`` of a server (``ServerClient``: URL and API key rules, errors)."""

    def fetch(server: str) -> dict[str, Any]:
        with ServerClient(server, api_key=api_key, timeout=timeout) as client:
            return client.adapters()

    return fetch


def _epoch(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _serves(entry: dict[str, Any]) -> str | None:
    live = entry.get("live")
    if isinstance(live, str):
        return live
    # A lazy name loads its desired version on the next request.
    return entry.get("desired") if entry.get("state") == "lazy" else None


def _staged(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The entry's staged versions (servers before issue 22 report none)."""
    staged = entry.get("staged")
    if not isinstance(staged, list):
        return []
    return [e for e in staged if isinstance(e, dict) and isinstance(e.get("version"), str)]


def staged_text(staged: list[dict[str, Any]]) -> str:
    """``v0003 (next), v0001 (rollback)``; ``!`` marks a version that failed to stage."""
    return ", ".join(
        f"{e['version']}{'!' if e.get('state') == 'failed' else ''}"
        + (f" ({e['why']})" if e.get("why") else "")
        for e in staged
    )


def compare_replicas(
    answers: dict[str, dict[str, Any] | str],
    first_seen: dict[tuple[str, str], float],
    now: float,
    names: Sequence[str] = (),
) -> tuple[list[Row], list[str]]:
    """Rows (name, replica) with lags, and the problems: unreadable servers, lagging rows.

    ``answers`` maps each server to its status, or to why it could not be read (the error
    names the URL). ``first_seen``
    remembers when this command first saw a (name, version) that a replica does not serve,
    for servers that report no ``desired_since``.
    """
    problems: list[str] = []
    per_name: dict[str, dict[str, dict[str, Any]]] = {}
    for server, answer in answers.items():
        if isinstance(answer, str):
            problems.append(answer)
            continue
        if answer.get("sync_error"):
            problems.append(f"{server}: {answer['sync_error']}")
        for entry in answer["data"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            if not names or entry["name"] in names:
                per_name.setdefault(entry["name"], {})[server] = entry
    readable = [s for s, a in answers.items() if not isinstance(a, str)]
    rows: list[Row] = []
    for name in sorted(per_name):
        entries = per_name[name]
        # The target: the desired version that became current last, across replicas.
        stamped = [
            (_epoch(e.get("desired_since")) or 0.0, str(e["desired"]))
            for e in entries.values()
            if isinstance(e.get("desired"), str)
        ]
        target, since = (max(stamped)[1], max(stamped)[0] or None) if stamped else (None, None)
        for server in readable:
            entry = entries.get(server)
            if entry is None:
                rows.append(Row(name, server, None, None, "absent", None, 0.0, None))
            else:
                rows.append(
                    Row(
                        name,
                        server,
                        entry.get("desired"),
                        entry.get("live"),
                        str(entry.get("state")),
                        _serves(entry),
                        0.0,
                        entry.get("error"),
                        _staged(entry),
                    )
                )
            row = rows[-1]
            if target is None or row.serves == target:
                continue
            start = since or first_seen.setdefault((name, target), now)
            row.lag_s = round(max(now - start, 0.0), 3) or 0.001
    return rows, problems


def watch(
    servers: Sequence[str],
    fetch: Fetch,
    *,
    max_lag_s: float,
    sleep: Callable[[float], None],
    names: Sequence[str] = (),
) -> tuple[list[Row], list[str], bool]:
    """Poll until every replica serves the same versions or a lag exceeds ``max_lag_s``.

    Returns the last rows, the problems, and whether the replicas agree.
    """
    first_seen: dict[tuple[str, str], float] = {}
    started = time.time()
    while True:
        answers: dict[str, dict[str, Any] | str] = {}
        for server in servers:
            try:
                answers[server] = fetch(server)
            except AgentFinetuneError as e:
                answers[server] = str(e)
        now = time.time()
        rows, problems = compare_replicas(answers, first_seen, now, names)
        behind = [r for r in rows if r.behind]
        if problems and not behind:
            return rows, problems, False
        if not behind:
            return rows, problems, True
        worst = max(r.lag_s for r in behind)
        if worst > max_lag_s or now - started > max_lag_s:
            return (
                rows,
                problems
                + [
                    f"{r.server}: {r.name} serves {r.serves or 'nothing'}, "
                    f"not {_target(rows, r.name)}, for {r.lag_s:.1f}s"
                    for r in behind
                ],
                False,
            )
        sleep(POLL_S)


def _target(rows: list[Row], name: str) -> str:
    versions = {r.serves for r in rows if r.name == name and not r.behind and r.serves}
    return ", ".join(sorted(versions)) or "?"


def cmd_status(args: argparse.Namespace) -> int:
    servers = list(dict.fromkeys(server_root(s) for s in args.server))
    rows, problems, agree = watch(
        servers,
        fetch_adapters(args.api_key),
        max_lag_s=args.max_lag,
        sleep=time.sleep,
        names=args.name or (),
    )
    if args.json:
        emit_json(
            {
                "agree": agree,
                "problems": problems,
                "rows": [asdict(r) for r in rows],
            }
        )
        return 0 if agree else 1
    shown = [r for r in rows if r.behind or r.error] if args.problems_only else rows
    if shown:
        print_table(
            [
                (
                    r.name,
                    r.server,
                    r.desired,
                    r.live,
                    r.state,
                    f"{r.lag_s:.1f}s" if r.behind else "",
                    staged_text(r.staged),
                    (r.error or "")[:80],
                )
                for r in shown
            ],
            ["NAME", "SERVER", "DESIRED", "LIVE", "STATE", "LAG", "STAGED", "LAST ERROR"],
        )
    n_names = len({r.name for r in rows})
    for p in problems:
        print(f"problem: {p}")
    print(
        f"{len(servers)} replica(s), {n_names} name(s): "
        + ("in agreement" if agree else "NOT in agreement")
    )
    return 0 if agree else 1


def add_status_parser(sub: Any) -> None:
    """Add ``status``: compare what each replica serves."""
    p = sub.add_parser(
        "status",
        help="show what each server serves, per name; exit 1 when replicas disagree",
        description=(
            "Read GET /v1/adapters from each server and show, per name and replica, the "
            "desired and live version, the state, the lag and the last error. Waits up to "
            "--max-lag seconds for replicas to converge; exits 1 when they still disagree, "
            "a replica lags longer than that, or a server cannot be read."
        ),
    )
    add_server_options(p, purpose="a server to read", replicas=True)
    p.add_argument(
        "--max-lag",
        type=float,
        default=DEFAULT_MAX_LAG_S,
        help=f"seconds a replica may lag before it counts (default {DEFAULT_MAX_LAG_S:g})",
    )
    p.add_argument("--name", action="append", help="only this adapter name (repeat for more)")
    p.add_argument("--problems-only", action="store_true", help="list only lagging or failed names")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
