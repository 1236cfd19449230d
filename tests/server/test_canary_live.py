"""Safe rollout against the real vLLM CPU server: eval, gated promote, canary and feedback.

Reuses the session's server (tests/server/conftest.py); the two-replica test starts a second
server on the same registry, after the first is up.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from hotswap_live import API_KEY, MAX_TOKENS, PROMPT, RESYNC_S, Live

from agent_finetune.cli.app import EXIT_REFUSED, main
from agent_finetune.registry.canary_state import read_canary
from agent_finetune.registry.eval_records import read_evals

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def cli(live: Live, *args: str) -> int:
    return main([*args, "--registry", str(live.registry.root)])


def server_args(live: Live) -> list[str]:
    return ["--server", live.handle.base_url, "--api-key", API_KEY]


def write_rows(live: Live, n: int = 10) -> str:
    path = live.workdir / "heldout.jsonl"
    rows = [{"instruction": f"{PROMPT} ({i})", "response": f"Open Settings {i}."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


def chat(live: Live, model: str, user: str | None = None, client: Any = None) -> Any:
    extra = {"user": user} if user else {}
    return (client or live.client()).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        **extra,
    )


def post(live: Live, route: str, body: Any, key: str | None = API_KEY) -> tuple[int, Any]:
    req = urllib.request.Request(
        live.handle.url + route,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def last_action(live: Live, name: str) -> str | None:
    history = live.registry.history(name)
    return history[-1]["action"] if history else None


def canary_status(live: Live, name: str) -> dict[str, Any] | None:
    found = (live.status().get("canary") or {}).get("names", {}).get(name)
    return dict(found) if found else None


def test_eval_and_gated_promote_through_the_server(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    name, data = "gated", write_rows(live)
    live.registry.publish(name, live.good[4])
    twin = live.registry.publish(name, live.good[4], make_current=False).version  # same weights
    live.wait_live(name, "v0001")

    assert cli(live, "eval", f"{name}@{twin}", "--data", data, *server_args(live), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["live"] == "v0001" and out["rows"] == 10
    loglik = out["comparison"]["loglik"]
    assert loglik["delta"] == 0 and loglik["ties"] == 10  # same weights, deterministic loglik
    assert out["means"]["v0001"]["loglik"] < 0
    records = read_evals(live.registry, name)
    assert {r["version"] for r in records} == {"v0001", twin}
    assert records[0]["via"] == live.handle.base_url

    # The same weights are not better: refused, exit 3, table printed, decision in history.
    code = cli(live, "promote", f"{name}@{twin}", "--if-better", "--data", data, *server_args(live))
    assert code == EXIT_REFUSED == 3
    printed = capsys.readouterr().out
    assert "REFUSED" in printed and "WIN RATE" in printed and "loglik" in printed
    assert live.registry.current(name) == "v0001"
    gate = live.registry.history(name)[-1]
    assert gate["action"] == "gate" and gate["decision"] == "refuse"
    assert gate["comparison"]["candidate"] == gate["comparison"]["live"]

    # A different version with a bar it clears: promoted, both scores in history.
    other = live.registry.publish(name, live.good[5], make_current=False).version
    args = ["--if-better", "--data", data, "--min-delta", "-1000", *server_args(live)]
    assert cli(live, "promote", f"{name}@{other}", *args) == 0
    assert "PROMOTED" in capsys.readouterr().out
    assert live.registry.current(name) == other
    moved = live.registry.history(name)[-1]  # the decision is written with its move
    assert moved["action"] == "promote" and moved["gate"]["decision"] == "promote"
    assert "vs" in moved["reason"] and "win rate" in moved["reason"]
    live.wait_live(name, other)

    assert cli(live, "list", name) == 0
    assert "loglik" in capsys.readouterr().out  # the LAST EVAL column


def test_canary_split_sticky_feedback_and_auto_abort(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "canaried"
    live.registry.publish(name, live.good[6])
    live.registry.publish(name, live.good[7], make_current=False)
    live.wait_live(name, "v0001")
    guards = ["--min-requests", "1000", "--min-feedback", "3", "--max-negative-feedback", "0.5"]
    assert cli(live, "canary", "start", f"{name}@v0002", "--weight", "50", *guards) == 0
    live.wait_for(lambda: canary_status(live, name), "the server to pick up the canary")

    client = live.client()
    served = {u: chat(live, name, f"user-{u}", client) for u in range(24)}
    models = {u: r.model for u, r in served.items()}
    assert set(models.values()) == {f"{name}@v0001", f"{name}@v0002"}  # names who answered
    for u in range(6):  # sticky: the same user, the same version
        assert chat(live, name, f"user-{u}", client).model == models[u]
    counters = canary_status(live, name)["versions"]  # type: ignore[index]
    assert sum(v["requests"] for v in counters.values()) == 30
    assert counters["v0002"]["role"] == "candidate" and counters["v0002"]["p50_token_s"] > 0
    metrics_text = urllib.request.urlopen(live.handle.url + "/metrics", timeout=10).read().decode()
    assert (
        f'agent_finetune_canary_requests_total{{name="{name}",role="candidate",version="v0002"}}'
        in metrics_text
    )

    # Feedback: honours --api-key, checks the body, knows only answers it served.
    candidate_ids = [r.id for r in served.values() if r.model.endswith("v0002")]
    route = f"/v1/adapters/{name}/feedback"
    assert post(live, route, {"id": candidate_ids[0], "score": -1}, key=None)[0] == 401
    assert post(live, route, {"id": candidate_ids[0], "score": 5})[0] == 400
    assert post(live, route, {"id": "chatcmpl-nobody", "score": -1})[0] == 404
    # One answer scores once: replays of a positive score never dilute the negatives.
    current_ids = [r.id for r in served.values() if r.model.endswith("v0001")]
    for _ in range(5):
        assert post(live, route, {"id": current_ids[0], "score": 1})[1]["version"] == "v0001"
    for rid in candidate_ids[:3]:
        code, answer = post(live, route, {"id": rid, "score": -1})
        if code == 200:
            assert answer["version"] == "v0002"
    # The third negative score trips the guard: canary_abort in history, 100% on current.
    live.wait_for(lambda: last_action(live, name) == "canary_abort", "the canary to be aborted")
    assert read_canary(live.registry, name) is None
    abort = live.registry.history(name)[-1]
    assert abort["action"] == "canary_abort" and "negative feedback" in abort["reason"]
    assert live.registry.current(name) == "v0001"
    assert {chat(live, name, f"user-{u}", client).model for u in range(12)} == {f"{name}@v0001"}

    assert cli(live, "canary", "status", name) == 0
    assert "no canary running" in capsys.readouterr().out


def test_canary_auto_promote_then_cli_abort_and_promote(live: Live) -> None:
    name = "promoted"
    live.registry.publish(name, live.good[0])
    live.registry.publish(name, live.good[1], make_current=False)
    live.wait_live(name, "v0001")
    args = ["--weight", "100", "--min-requests", "2", "--duration", "1s", "--auto-promote"]
    assert cli(live, "canary", "start", f"{name}@v0002", *args) == 0
    live.wait_for(lambda: canary_status(live, name), "the server to pick up the canary")

    def promoted() -> bool:
        chat(live, name)
        return live.registry.current(name) == "v0002"

    live.wait_for(promoted, "auto-promotion after the green duration")
    live.wait_for(lambda: last_action(live, name) == "canary_promote", "canary_promote in history")
    live.wait_live(name, "v0002")

    # By hand: abort sends everything back within one resync, promote makes it current.
    assert cli(live, "canary", "start", f"{name}@v0001", "--weight", "100") == 0
    live.wait_for(lambda: chat(live, name).model == f"{name}@v0001", "routing to the candidate")
    assert cli(live, "canary", "abort", name, "--reason", "test") == 0
    started = time.monotonic()
    live.wait_for(lambda: chat(live, name).model == f"{name}@v0002", "routing back to current")
    assert time.monotonic() - started < 10 * RESYNC_S + 5
    assert cli(live, "canary", "start", f"{name}@v0001", "--weight", "10") == 0
    assert cli(live, "canary", "promote", name) == 0
    live.wait_live(name, "v0001")
    assert chat(live, name).model == f"{name}@v0001"


def test_unservable_candidate_aborts_and_users_get_current(live: Live) -> None:
    name = "unservable"
    live.registry.publish(name, live.good[2])
    live.registry.publish(name, live.bad["rank"], make_current=False)  # r=32 > --max-lora-rank
    live.wait_live(name, "v0001")
    assert cli(live, "canary", "start", f"{name}@v0002", "--weight", "100") == 0
    live.wait_for(lambda: canary_status(live, name), "the server to pick up the canary")
    assert chat(live, name).model == f"{name}@v0001"  # never an error for the user
    live.wait_for(lambda: last_action(live, name) == "canary_abort", "the canary to be aborted")
    assert read_canary(live.registry, name) is None
    assert "candidate cannot be served" in live.registry.history(name)[-1]["reason"]


def test_two_replicas_share_one_canary(live: Live) -> None:
    """A second server on the same registry: one replica's abort empties both; the replica
    with the evidence promotes, once."""
    name = "replicated"
    live.registry.publish(name, live.good[3])
    live.registry.publish(name, live.good[4], make_current=False)
    other = live.start_replica("canary-replica", max_cpu_loras=8)
    try:
        other.wait_ready(900)
        from openai import OpenAI

        b = OpenAI(base_url=other.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        a = live.client()
        live.wait_live(name, "v0001")
        guards = ["--min-requests", "1000", "--min-feedback", "1", "--max-negative-feedback", "0"]
        assert cli(live, "canary", "start", f"{name}@v0002", "--weight", "100", *guards) == 0
        for client in (a, b):
            live.wait_for(
                lambda c=client: chat(live, name, client=c).model == f"{name}@v0002",
                "both replicas to route to the candidate",
            )
        # Replica B trips the guard with a score for an answer replica A gave (B finds it
        # in A's record in the registry); replica A stops routing within one resync.
        answer = chat(live, name, client=a)
        req = urllib.request.Request(
            other.url + f"/v1/adapters/{name}/feedback",
            data=json.dumps({"id": answer.id, "score": -1}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        assert urllib.request.urlopen(req, timeout=30).status == 200
        t0 = time.monotonic()
        live.wait_for(lambda: chat(live, name, client=a).model == f"{name}@v0001", "A to drop it")
        assert time.monotonic() - t0 < 2 * RESYNC_S + 5
        live.wait_for(lambda: last_action(live, name) == "canary_abort", "canary_abort logged")
        assert [e["action"] for e in live.registry.history(name)].count("canary_abort") == 1

        # Promotion: only the replica that saw --min-requests candidate requests decides.
        args = ["--weight", "100", "--min-requests", "3", "--duration", "1s", "--auto-promote"]
        assert cli(live, "canary", "start", f"{name}@v0002", *args) == 0
        live.wait_for(lambda: chat(live, name, client=a).model == f"{name}@v0002", "A routes")
        live.wait_for(
            lambda: live.registry.current(name) == "v0002" or chat(live, name, client=a) is None,
            "A to promote",
        )
        live.wait_for(lambda: last_action(live, name) == "canary_promote", "canary_promote")
        history = [e["action"] for e in live.registry.history(name)]
        assert history.count("canary_promote") == 1
        live.wait_for(lambda: chat(live, name, client=b).model == f"{name}@v0002", "B to follow")
    finally:
        other.stop()


def test_an_operator_wins_over_a_running_canary(live: Live) -> None:
    """Finding: a rollback during a canary left it routing its share, and its auto-promote
    then reverted the rollback. Now the operator's move ends it; every answer after the
    move lands on the operator's version, and the canary never comes back."""
    name = "operated"
    live.registry.publish(name, live.good[5])
    live.registry.publish(name, live.good[6])
    live.registry.publish(name, live.good[7], make_current=False)
    live.wait_live(name, "v0002")
    args = ["--weight", "100", "--min-requests", "1", "--duration", "2s", "--auto-promote"]
    assert cli(live, "canary", "start", f"{name}@v0003", *args) == 0
    live.wait_for(lambda: chat(live, name).model == f"{name}@v0003", "routing to the candidate")
    assert cli(live, "rollback", name) == 0  # back to v0001
    ends = [e for e in live.registry.history(name) if e["action"] == "canary_abort"]
    assert ends and "operators win" in ends[-1]["reason"]
    live.wait_for(lambda: chat(live, name).model == f"{name}@v0001", "the server to follow")
    time.sleep(3 * RESYNC_S + 2)  # longer than the canary's duration: nothing promotes
    assert {chat(live, name).model for _ in range(8)} == {f"{name}@v0001"}
    assert live.registry.current(name) == "v0001"
    assert "canary_promote" not in [e["action"] for e in live.registry.history(name)]
