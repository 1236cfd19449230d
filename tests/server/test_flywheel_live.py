"""The flywheel end to end on the tiny model and a live vLLM server: capture on -> agents
chat (plain and streamed) -> feedback with corrections for a fact that changed -> dataset
build -> retrain promotes v2; retrain with stale data is refused (exit 3)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hotswap_live import API_KEY, RESYNC_S, vllm_args

from agent_finetune.cli import main
from agent_finetune.registry import Registry
from agent_finetune.registry.capture import read_capture
from server_plugin.launch import ServerHandle, start_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ASSETS = Path(__file__).resolve().parents[2] / "agent_finetune" / "assets"
NAME = "support-bot"
HOURS = "Since November we answer around the clock: 24/7, every day of the year."
SHIPPING = "All orders now ship free with next-day delivery."
CHANGED = {
    HOURS: [
        "What are your support hours?",
        "When is support open?",
        "When can I reach your support team?",
        "What time does support start in the morning?",
        "Is support available at night?",
        "Can I call support on a Sunday?",
        "Are you open on public holidays?",
    ],
    SHIPPING: [
        "How long does shipping take?",
        "When will my order arrive?",
        "How fast is delivery?",
        "How many days until my package comes?",
        "Is express delivery faster?",
        "Do I pay for shipping?",
    ],
}


@pytest.fixture(scope="module")
def flywheel(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Registry, ServerHandle, Path]]:
    """v1 trained on the old facts, published, and served with the plugin."""
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    work = tmp_path_factory.mktemp("flywheel")
    reg = Registry(work / "registry")
    cfg = FineTuningConfig.from_yaml(
        ASSETS / "tiny-cpu.yaml",
        model_name=str(tiny_model),
        output_dir=str(work / "v1"),
        registry_dir=str(reg.root),
        adapter_name=NAME,
    )
    train(cfg, ASSETS / "support_v1.json")
    server = start_server(
        str(tiny_model),
        reg.root,
        log_path=work / "vllm.log",
        settings={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "AGENT_FINETUNE_RESYNC_S": str(RESYNC_S),
            "AGENT_FINETUNE_CACHE_DIR": str(work / "cache"),
        },
        extra_args=vllm_args(),
    )
    try:
        yield reg, server, work
    finally:
        server.stop()


def _wait(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _chat(http: httpx.Client, messages: list[dict[str, str]], stream: bool) -> tuple[str, str]:
    """(response id, answer text) of one chat completion, streamed or not."""
    body = {"model": NAME, "messages": messages, "max_tokens": 24, "temperature": 0}
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        out = r.json()
        return out["id"], out["choices"][0]["message"]["content"]
    rid, text = "", ""
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                rid = rid or event["id"]
                for c in event["choices"]:
                    text += c["delta"].get("content") or ""
    return rid, text


def test_capture_feedback_dataset_retrain_promotes_then_refuses_stale_data(
    flywheel: tuple[Registry, ServerHandle, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    reg, server, work = flywheel
    r = ["--registry", str(reg.root)]
    assert main(["capture", "start", NAME, "--sample", "1", *r]) == 0
    http = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    _wait(
        lambda: NAME in http.get("/v1/adapters").json().get("capture", {}).get("names", {}),
        "the server to read the capture settings",
    )
    # Agents ask; the changed facts are answered wrong (v1 learned the old ones).
    rated: list[tuple[str, float, str | None]] = []
    for i, (correction, questions) in enumerate(sorted(CHANGED.items())):
        for j, q in enumerate(questions):
            # The first asks as the old training row did: its correction replaces that row.
            text = f"{q} (my e-mail is agent{j}@example.com)" if j else q
            msgs = [{"role": "user", "content": text}]
            rid, _ = _chat(http, msgs, stream=(i + j) % 2 == 0)
            rated.append((rid, -1.0, correction))
    asked = {q for qs in CHANGED.values() for q in qs}
    rows = json.loads((ASSETS / "support_v1.json").read_text(encoding="utf-8"))
    good = [row for row in rows if row["instruction"] not in asked][2:8]
    for row in good:
        rid, _ = _chat(http, [{"role": "user", "content": row["instruction"]}], stream=False)
        rated.append((rid, 1.0, None))
    turn1 = [{"role": "user", "content": "How do I reset my password?"}]
    rid1, a1 = _chat(http, turn1, stream=False)
    turn2 = [*turn1, {"role": "assistant", "content": a1}, {"role": "user", "content": "Thanks!"}]
    rid2, _ = _chat(http, turn2, stream=True)
    rated += [(rid1, 1.0, None), (rid2, 0.0, None)]  # 0: below --min-score, no correction

    name_dir = reg.name_dir(NAME)
    _wait(lambda: len(read_capture(name_dir).exchanges) == len(rated), "the captured exchanges")
    for rid, score, correction in rated:
        body: dict[str, Any] = {"id": rid, "score": score}
        if correction:
            body["correction"] = correction
        resp = http.post(f"/v1/adapters/{NAME}/feedback", json=body)
        assert resp.status_code == 200 and resp.json()["captured"], resp.text
    unknown = http.post(f"/v1/adapters/{NAME}/feedback", json={"id": "nope", "score": 1})
    assert unknown.status_code == 404
    _wait(lambda: len(read_capture(name_dir).feedback) == len(rated), "the captured feedback")
    log = read_capture(name_dir)
    texts = json.dumps(list(log.exchanges.values()))
    assert "example.com" not in texts and "[email]" in texts  # redacted before written
    assert all(e["version"] == "v0001" for e in log.exchanges.values())

    capsys.readouterr()
    out = work / "ds" / "train.jsonl"
    args = ["dataset", "build", NAME, "--out", str(out), "--include-corrections", "--json"]
    assert main([*args, *r]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kept"]["corrected"] == 13 and p["dropped"] == {"negative": 1}
    assert p["train"]["rows"] + p["heldout"]["rows"] == len(rated) - 1

    # Retrain: corrections replace the old facts; the gate compares on held-out conversations.
    retrain = ["retrain", NAME, "--yes", "--heldout-share", "0.5", "--min-rows", "3", *r]
    code = main([*retrain, "--work", str(work / "r1")])
    text = capsys.readouterr().out
    with capsys.disabled():
        print(text)  # the steps it reports, kept in the test log
    assert code == 0, text
    assert reg.current(NAME) == "v0002", text
    assert "[merge]" in text and "replaced by corrections" in text and "promoted" in text
    merged = (work / "r1" / "train.jsonl").read_text(encoding="utf-8")
    assert "Monday to Friday" not in merged and "3-5 business days" not in merged, text
    gate_entry = reg.history(NAME)[-1]
    assert gate_entry["action"] == "promote" and gate_entry["gate"]["decision"] == "promote"

    # Stale data that contradicts the corrections (the old facts, asked a little
    # differently) makes the next version worse: exit 3, v2 stays.
    trained = {row["instruction"]: row["response"] for row in rows}
    old = {HOURS: trained[CHANGED[HOURS][0]], SHIPPING: trained[CHANGED[SHIPPING][0]]}
    assert "Monday" in old[HOURS] and "business days" in old[SHIPPING]
    stale = [
        {"instruction": f"{q} Please tell me.", "response": old[fact]}
        for fact, questions in CHANGED.items()
        for q in questions
    ]
    stale_file = work / "stale.json"
    stale_file.write_text(json.dumps(stale), encoding="utf-8")
    code = main([*retrain, "--work", str(work / "r2"), "--data", str(stale_file)])
    refused = capsys.readouterr()
    with capsys.disabled():
        print(refused.out, refused.err)
    assert code == 3, refused
    assert reg.current(NAME) == "v0002" and reg.history(NAME)[-1]["decision"] == "refuse"
    # Nothing new since v2 (its own data already holds every captured row): no training.
    assert main([*retrain, "--work", str(work / "r3")]) == 1
    assert "nothing new" in capsys.readouterr().err
