"""Pin middleware under a large request body, beside small requests (no vLLM).

Streams one large chat-completions body (64 KiB ASGI messages, a pinned ``model`` so the
middleware has a reason to look) through the pin middleware into a fake app that reads
it, while small pinned requests go through the same middleware on the same event loop
every 10 ms. Reports how long the big request took, the small requests' latency, and the
longest event-loop stall (a 1 ms ticker's worst lateness). Baseline, same run: the
middleware as it was before issue 10 (``bytes +=``, ``json.loads`` on the loop).

    PYTHONPATH=$PWD .venv/bin/python bench/middleware_body.py --json bench/middleware_body.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from server_plugin.middleware import ModelRequestMiddleware
from server_plugin.reconciler import PinRefusal

CHUNK = 64 * 1024
SMALL = json.dumps({"model": "x@v0001", "messages": [{"role": "user", "content": "hi"}]})


class _Reconciler:
    async def ensure_pinned(self, model: str) -> PinRefusal | None:
        return None


class _Plugin:
    reconciler = _Reconciler()
    max_parse_bytes = 1 << 20


class LegacyMiddleware:
    """The middleware before issue 10, kept here only as the baseline."""

    def __init__(self, app: Any, plugin: Any) -> None:
        self.app, self.plugin = app, plugin

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if b"@" in body:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None
            if isinstance(model, str) and "@" in model:
                await self.plugin.reconciler.ensure_pinned(model)

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the body like vLLM (chunks joined once) and answers."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def chunked(body: bytes) -> list[bytes]:
    return [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]


async def call(middleware: Any, chunks: list[bytes]) -> float:
    it = iter(range(len(chunks)))
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}

    async def receive() -> dict[str, Any]:
        i = next(it)
        await asyncio.sleep(0)  # a socket read yields to the loop
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    async def send(message: Any) -> None:
        pass

    t0 = time.perf_counter()
    await middleware(scope, receive, send)
    return time.perf_counter() - t0


def big_body(size: int) -> bytes:
    head = b'{"model": "x@v0001", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


async def scenario(middleware: Any, size: int) -> dict[str, float]:
    chunks, small_chunks = chunked(big_body(size)), chunked(SMALL.encode())  # before timing
    stalls: list[float] = []
    small: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - t0 - 0.001)

    async def smalls() -> None:
        while not done.is_set():
            small.append(await call(middleware, small_chunks))
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(smalls())]
    await asyncio.sleep(0.05)
    big = await call(middleware, chunks)
    done.set()
    await asyncio.gather(*tasks)
    return {
        "big_s": round(big, 3),
        "small_p50_ms": round(statistics.median(small) * 1e3, 2),
        "small_max_ms": round(max(small) * 1e3, 1),
        "max_stall_ms": round(max(stalls) * 1e3, 1),
        "small_requests": len(small),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="1,16,32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for mb in [int(s) for s in args.sizes_mb.split(",")]:
        for label, cls in (
            ("before (bytes +=)", LegacyMiddleware),
            ("now", ModelRequestMiddleware),
        ):
            result = asyncio.run(scenario(cls(app, _Plugin()), mb << 20))  # type: ignore[arg-type]
            rows.append({"body_mb": mb, "middleware": label, **result})
    print("| body | middleware | big request | small p50 | small max | worst loop stall |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['body_mb']} MB | {r['middleware']} | {r['big_s']} s | {r['small_p50_ms']} ms "
            f"| {r['small_max_ms']} ms | {r['max_stall_ms']} ms |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
