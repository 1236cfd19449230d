"""Capture's cost (issue 23), without vLLM.

- **Request path**: ``CaptureMiddleware`` around a fake app that answers a chat completion
  like vLLM (one JSON body, or an SSE stream of ``--stream-chunks`` deltas): microseconds
  added per request over calling the app directly, with capture off (no name captures),
  on at sample 0 (the draw, nothing kept) and on at sample 1.0 (every answer kept and
  queued), in ``--rounds`` rounds of ``--requests`` (scenarios order-rotated per round;
  min / median / max over rounds). The writer does not run meanwhile (its work is the
  next part); the queue is emptied between rounds.
- **Writer**: rows per second that one writer thread parses, redacts (built-in patterns)
  and appends (``Capture.drain``), for plain and streamed answers.
- **Burst**: a burst of ``2 x --queue`` answers with no writer: how many were dropped.
- **Disk bound**: ``--flood`` records through the writer with ``max_bytes`` 1 MiB, the
  folder's size checked after every drain: the largest seen.
- **Settings pass**: one ``Capture.refresh`` (the writer thread re-reads every name's
  settings each resync) over a registry of ``--names`` names, 10 of them capturing:
  milliseconds, median of 7.

    PYTHONPATH=$PWD .venv/bin/python bench/capture.py --json bench/capture.json
    PYTHONPATH=$PWD .venv/bin/python bench/capture.py --live --json bench/capture_live.json

``--live``: a plugin server on the tiny model (vLLM CPU), ``--live-rounds`` rounds of
``--live-requests`` sequential 16-token chat completions with capture off and on (sample
1.0), order alternating per round: requests/s and the on/off ratio per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_finetune.registry import Registry
from agent_finetune.registry.capture import CaptureSettings, segments, write_settings
from agent_finetune.training.numpy_adapter import write_adapter
from server_plugin.capture import Capture, CaptureMiddleware

NAME = "bot"
QUESTION = "My card 4111 1111 1111 1111 was charged twice; mail me at ann@example.com. " * 3
ANSWER = "I am sorry about that: the duplicate charge is refunded within 3-5 days. " * 4


def fake_app(stream: bool, chunks: int) -> Any:
    plain = json.dumps(
        {
            "id": "chatcmpl-1",
            "model": f"{NAME}@v0001",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}],
        }
    ).encode()
    piece = len(ANSWER) // chunks
    events = [
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-1",
                "model": f"{NAME}@v0001",
                "choices": [
                    {"index": 0, "delta": {"content": ANSWER[i * piece : (i + 1) * piece]}}
                ],
            }
        ).encode()
        + b"\n\n"
        for i in range(chunks)
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if not stream:
            await send({"type": "http.response.body", "body": plain})
            return
        for e in events:
            await send({"type": "http.response.body", "body": e, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


BODY = json.dumps({"model": NAME, "messages": [{"role": "user", "content": QUESTION}]}).encode()
SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def _requests(app: Any, n: int) -> float:
    """Seconds for ``n`` sequential requests through ``app``."""

    async def send(message: Any) -> None:
        pass

    t0 = time.perf_counter()
    for _ in range(n):
        sent = False

        async def receive() -> Any:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}

        await app(SCOPE, receive, send)
    return time.perf_counter() - t0


def setup(root: Path, sample: float | None, max_bytes: int = 1 << 30) -> tuple[Registry, Capture]:
    reg = Registry(root / "registry")
    if not reg.versions(NAME):
        reg.publish(NAME, write_adapter(root / "adapter", seed=1))
    if sample is not None:
        write_settings(
            reg.name_dir(NAME), CaptureSettings(enabled=True, sample=sample, max_bytes=max_bytes)
        )
    cap = Capture(reg, "bench", max_queue=1 << 30)
    cap.refresh()
    return reg, cap


def request_path(root: Path, rounds: int, n: int, stream: bool, chunks: int) -> dict[str, Any]:
    app = fake_app(stream, chunks)
    scenarios: dict[str, Any] = {}
    for label, sample in (("off", None), ("on, sample 0", 0.0), ("on, sample 1.0", 1.0)):
        _, cap = setup(root / label.replace(" ", "_").replace(",", ""), sample)
        scenarios[label] = (CaptureMiddleware(app, lambda c=cap: c), cap)
    added: dict[str, list[float]] = {k: [] for k in scenarios}
    for r in range(rounds):
        order = list(scenarios)
        order = order[r % len(order) :] + order[: r % len(order)]
        bare = asyncio.run(_requests(app, n))
        for label in order:
            mw, cap = scenarios[label]
            took = asyncio.run(_requests(mw, n))
            added[label].append((took - bare) / n * 1e6)
            cap._queue.clear()
    return {
        label: {
            "us_per_request_median": round(statistics.median(v), 2),
            "min": round(min(v), 2),
            "max": round(max(v), 2),
        }
        for label, v in added.items()
    }


def writer(root: Path, n: int, stream: bool, chunks: int) -> dict[str, Any]:
    _, cap = setup(root, 1.0)
    mw = CaptureMiddleware(fake_app(stream, chunks), lambda: cap)
    asyncio.run(_requests(mw, n))
    t0 = time.perf_counter()
    written = cap.drain()
    took = time.perf_counter() - t0
    return {"rows": written, "seconds": round(took, 3), "rows_per_s": round(written / took)}


def burst(root: Path, queue: int) -> dict[str, Any]:
    _, cap = setup(root, 1.0)
    cap.max_queue = queue
    mw = CaptureMiddleware(fake_app(False, 1), lambda: cap)
    asyncio.run(_requests(mw, 2 * queue))
    return {"sent": 2 * queue, "queue": queue, "dropped": cap.dropped.get("queue_full", 0)}


def disk_bound(root: Path, flood: int) -> dict[str, Any]:
    reg, cap = setup(root, 1.0, max_bytes=1 << 20)
    mw = CaptureMiddleware(fake_app(False, 1), lambda: cap)
    largest, batches = 0, 0
    for _ in range(flood // 500):
        asyncio.run(_requests(mw, 500))
        cap.pass_once(time.monotonic(), refresh=False)
        folder = reg.name_dir(NAME) / "capture"
        largest = max(largest, sum(s.size for s in segments(folder)))
        batches += 1
    return {"records": batches * 500, "max_bytes": 1 << 20, "largest_folder_bytes": largest}


def settings_pass(root: Path, names: int) -> dict[str, Any]:
    reg = Registry(root / "registry")
    for i in range(names):
        (reg.root / f"n{i:05d}" / "versions").mkdir(parents=True)
    for i in range(0, names, max(1, names // 10)):
        write_settings(reg.name_dir(f"n{i:05d}"), CaptureSettings(enabled=True))
    cap = Capture(reg, "bench")
    took = []
    for _ in range(7):
        t0 = time.perf_counter()
        cap.refresh()
        took.append((time.perf_counter() - t0) * 1000)
    return {
        "names": names,
        "capturing": len(cap.names),
        "ms_median": round(statistics.median(took), 1),
        "ms_min": round(min(took), 1),
        "ms_max": round(max(took), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--stream-chunks", type=int, default=16)
    ap.add_argument("--writer-rows", type=int, default=20000)
    ap.add_argument("--queue", type=int, default=10000)
    ap.add_argument("--flood", type=int, default=20000)
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--live", action="store_true", help="only the live server comparison")
    ap.add_argument("--live-rounds", type=int, default=8)
    ap.add_argument("--live-requests", type=int, default=30)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    out: dict[str, Any] = {"settings": vars(args)}
    if args.live:
        with tempfile.TemporaryDirectory() as tmp:
            out["live"] = live(args.live_rounds, args.live_requests, Path(tmp))
        print(json.dumps(out["live"], indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for stream in (False, True):
            kind = "stream" if stream else "plain"
            out[f"request_path_{kind}"] = request_path(
                root / f"rp-{kind}", args.rounds, args.requests, stream, args.stream_chunks
            )
            out[f"writer_{kind}"] = writer(
                root / f"w-{kind}", args.writer_rows, stream, args.stream_chunks
            )
            print(kind, out[f"request_path_{kind}"], out[f"writer_{kind}"], flush=True)
        out["burst"] = burst(root / "burst", args.queue)
        out["disk_bound"] = disk_bound(root / "disk", args.flood)
        out["settings_pass"] = settings_pass(root / "names", args.names)
    print(json.dumps({k: out[k] for k in ("burst", "disk_bound", "settings_pass")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


def live(rounds: int, requests: int, workdir: Path) -> dict[str, Any]:
    """A plugin server on the tiny model: requests/s of sequential 16-token chat
    completions with capture off and on (sample 1.0), alternating per round."""
    import httpx

    from agent_finetune.training.tiny_model import build_tiny_model, random_adapter
    from server_plugin.launch import start_server

    model = build_tiny_model(workdir / "tiny")
    reg = Registry(workdir / "registry")
    reg.publish(NAME, random_adapter(model, workdir / "adapter", seed=1))
    server = start_server(
        str(model),
        reg.root,
        log_path=workdir / "vllm.log",
        settings={"VLLM_CPU_KVCACHE_SPACE": "1", "AGENT_FINETUNE_RESYNC_S": "0.5"},
        extra_args=["--max-model-len", "256", "--dtype", "bfloat16"],
    )
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 16, "temperature": 0}  # fmt: skip
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        http = httpx.Client(base_url=server.url, timeout=120)

        def switch(on: bool) -> None:
            write_settings(reg.name_dir(NAME), CaptureSettings(enabled=on, sample=1.0))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                names = http.get("/v1/adapters").json().get("capture", {}).get("names", {})
                if (NAME in names) == on:
                    return
                time.sleep(0.1)
            raise RuntimeError("the server did not pick up the capture setting")

        for _ in range(3):  # warm-up
            http.post("/v1/chat/completions", json=body).raise_for_status()
        for r in range(rounds):
            for label in ("off", "on") if r % 2 == 0 else ("on", "off"):
                switch(label == "on")
                t0 = time.perf_counter()
                for _ in range(requests):
                    http.post("/v1/chat/completions", json=body).raise_for_status()
                rates[label].append(requests / (time.perf_counter() - t0))
        captured = sum(1 for _ in (reg.name_dir(NAME) / "capture").glob("*.jsonl"))
    finally:
        server.stop()
    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    return {
        "rounds": rounds,
        "requests_per_round": requests,
        "req_per_s_off_median": round(statistics.median(rates["off"]), 2),
        "req_per_s_on_median": round(statistics.median(rates["on"]), 2),
        "on_over_off_per_round": [round(x, 3) for x in ratios],
        "on_over_off_median": round(statistics.median(ratios), 3),
        "capture_segments": captured,
    }


if __name__ == "__main__":
    main()
