"""The plugin's request-path code, without vLLM: its per-request cost, and large bodies.

``--part request-path``: the plugin's two ASGI middlewares stacked as vLLM runs them
(``AnswerHeaders`` outside ``ModelRequestMiddleware``) around a fake app that reads the body
and answers like vLLM (one JSON body, or an SSE stream of ``--stream-chunks`` chunks), with
a real ``Reconciler`` (a dict for vLLM's LoRA table) and ``CanaryRouter``: microseconds per
request over calling the app directly, for base-model, adapter (preload ``all``: a scan for
``@``; lazy: the body parsed), pinned and canaried requests, small and 64 KiB bodies, in
``--rounds`` rounds (scenarios order-rotated per round; min / median / max over rounds),
then a cProfile of each scenario naming the functions that cost. Besides the requests, the
plugin's periodic work on the API server's event loop: one reconcile pass and one canary
pass at 1, 8 and 64 names (all served, nothing changed: the steady state), as ms per pass
and as a share of one core at ``AGENT_FINETUNE_RESYNC_S=1``.

``--part big-body`` (the default): streams one large
chat-completions body (64 KiB ASGI messages, a pinned ``model`` so the
middleware has a reason to look) through the pin middleware into a fake app that reads
it, while small pinned requests go through the same middleware on the same event loop
every 10 ms. Reports how long the big request took, the small requests' latency, and the
longest event-loop stall (a 1 ms ticker's worst lateness). Baseline, same run: the
middleware as it was before issue 10 (``bytes +=``, ``json.loads`` on the loop).

    PYTHONPATH=$PWD .venv/bin/python bench/middleware_body.py --json bench/middleware_body.json
    PYTHONPATH=$PWD .venv/bin/python bench/middleware_body.py --part request-path \
        --json bench/request_path.json
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server_plugin.answers import AnswerHeaders
from server_plugin.failures import Refusal
from server_plugin.middleware import ModelRequestMiddleware
from server_plugin.version_metrics import VersionMetrics

CHUNK = 64 * 1024
SMALL = json.dumps({"model": "x@v0001", "messages": [{"role": "user", "content": "hi"}]})


class _Reconciler:
    lazy = False

    async def ensure(self, model: str, held: list[str] | None = None) -> Refusal | None:
        return None

    def release(self, held: list[str]) -> None:
        held.clear()


class _Plugin:
    reconciler = _Reconciler()
    canary = None  # no canary running
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
                await self.plugin.reconciler.ensure(model)

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def read_body(receive: Any) -> bytes:
    """The request body, read like vLLM reads it (chunks joined once)."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def ticker(done: asyncio.Event, stalls: list[float]) -> None:
    """Until ``done``: how late each 1 ms sleep wakes up (what blocks the event loop)."""
    while not done.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        stalls.append(time.perf_counter() - t0 - 0.001)


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the body like vLLM (chunks joined once) and answers."""
    await read_body(receive)
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

    async def smalls() -> None:
        while not done.is_set():
            small.append(await call(middleware, small_chunks))
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(ticker(done, stalls)), asyncio.create_task(smalls())]
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


# -- request path -------------------------------------------------------------------------
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
NAME, BASE = "bot", "/models/base"


class DictTransport:
    """vLLM's LoRA table as a dict (the reconciler's transport)."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}

    async def served(self) -> dict[str, str]:
        return dict(self.table)

    async def load(self, name: str, path: str) -> None:
        self.table[name] = path

    async def repoint(self, name: str, target: str) -> None:
        self.table[name] = self.table[target]

    async def unload(self, name: str) -> None:
        self.table.pop(name, None)


def chat_body(model: str, size: int = 0) -> bytes:
    """A chat request like an agent's; ``size`` pads the user turn to about that many bytes."""
    content = "How do I reset my password?"
    content += " Please answer briefly." * max(0, (size - 200) // 23)
    return json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a support assistant."},
                {"role": "user", "content": content},
            ],
            "max_tokens": 16,
            "temperature": 0,
        }
    ).encode()


def fake_vllm(stream_chunks: int) -> Callable[..., Any]:
    """Reads the body (chunks joined once) and answers as vLLM does: the served model named
    in the first body message (one JSON body, or ``stream_chunks`` SSE chunks)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # vLLM parses the body on both sides of the comparison; a byte search keeps
        # json's functions in the profile the plugin's own.
        found = re.search(rb'"model"\s*:\s*"([^"]+)"', await read_body(receive))
        model = found.group(1).decode() if found else "?"
        if model == NAME:  # vLLM answers with the name it resolved: the version's own
            model = f"{NAME}@v0001"
        head = f'{{"id":"chatcmpl-1","object":"chat.completion","model":"{model}",'.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if not stream_chunks:
            body = head + b'"choices":[{"index":0,"message":{"content":"Open Settings."}}],'
            body += b'"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}'
            await send({"type": "http.response.body", "body": body})
            return
        chunk = b"data: " + head + b'"choices":[{"delta":{"content":"x"}}]}\n\n'
        for _ in range(stream_chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


async def build_plugins(work: Path) -> dict[str, Any]:
    """Plugins (what the middlewares read) for preload ``all`` and a lazy policy, and one
    with a canary on ``bot`` (v0002 at 50%), on a registry of one name with two versions."""
    from agent_finetune.registry import Registry
    from agent_finetune.registry.canary_state import Canary
    from agent_finetune.training.numpy_adapter import write_adapter
    from server_plugin.cache import AdapterCache, Limits
    from server_plugin.canary_router import CanaryRouter
    from server_plugin.reconciler import Reconciler
    from server_plugin.settings import Settings

    registry = Registry(work / "registry")
    for seed in range(2):
        registry.publish(NAME, write_adapter(work / f"a{seed}", seed=seed), make_current=not seed)
    plugins = {}
    for policy in ("all", "none"):
        rec = Reconciler(
            registry,
            AdapterCache(work / f"cache-{policy}", Limits()),
            DictTransport(),
            Settings(preload=policy),
        )
        await rec.reconcile_once()
        assert await rec.ensure(NAME) is None
        assert await rec.ensure(f"{NAME}@v0002") is None
        canary = CanaryRouter(registry)
        plugins[policy] = type(
            "Plugin", (), {"reconciler": rec, "canary": canary, "max_parse_bytes": 1 << 20}
        )()
    canaried = CanaryRouter(registry)
    canaried.apply({NAME: Canary(NAME, "v0002", "v0001", 50.0, id="c1")}, {})
    plugins["canary"] = type(
        "Plugin",
        (),
        {"reconciler": plugins["all"].reconciler, "canary": canaried, "max_parse_bytes": 1 << 20},
    )()
    other = CanaryRouter(registry)
    other.apply({"other": Canary("other", "v0002", "v0001", 50.0, id="c2")}, {})
    plugins["canary-other"] = type(
        "Plugin",
        (),
        {"reconciler": plugins["all"].reconciler, "canary": other, "max_parse_bytes": 1 << 20},
    )()
    return plugins


# scenario -> (plugin, model, body bytes, streamed chunks)
SCENARIOS: dict[str, tuple[str, str, int, int]] = {
    "base model, preload all": ("all", BASE, 0, 0),
    "adapter, preload all": ("all", NAME, 0, 0),
    "adapter, lazy policy (body parsed)": ("none", NAME, 0, 0),
    "pinned bot@v0001": ("all", f"{NAME}@v0001", 0, 0),
    "adapter, canary on another name": ("canary-other", NAME, 0, 0),
    "adapter, canary on it (routed, metrics)": ("canary", NAME, 0, 0),
    "adapter, 64 KiB body, lazy policy": ("none", NAME, 64 << 10, 0),
    "adapter, streamed 64 chunks": ("all", NAME, 0, 64),
    "base model, streamed 64 chunks": ("all", BASE, 0, 64),
}


def stacked(plugin: Any, app: Any) -> Any:
    """The plugin's middlewares in vLLM's order (the last added runs first)."""

    async def describe(model: str) -> str | None:
        return None

    return AnswerHeaders(
        ModelRequestMiddleware(app, plugin),
        routes=ROUTES,
        describe=describe,
        versions=VersionMetrics(),  # as the plugin counts every answer per version
    )


async def per_request_s(handler: Any, body: bytes, n: int) -> float:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode())],
    }
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(message: Any) -> None:
        return None

    t0 = time.perf_counter()
    for _ in range(n):
        await handler(scope, receive, send)
    return (time.perf_counter() - t0) / n


def request_path(rounds: int, n: int) -> dict[str, Any]:
    """Microseconds the plugin adds per request, per scenario, over ``rounds`` rounds."""
    work = Path(tempfile.mkdtemp(prefix="request-path-"))

    async def measure() -> dict[str, Any]:
        plugins = await build_plugins(work)
        cases = {}
        for label, (plugin, model, size, chunks) in SCENARIOS.items():
            app = fake_vllm(chunks)
            cases[label] = (stacked(plugins[plugin], app), app, chat_body(model, size))
        labels = list(cases)
        added: dict[str, list[float]] = {label: [] for label in labels}
        bare: dict[str, list[float]] = {label: [] for label in labels}
        for rnd in range(rounds):
            for label in labels[rnd % len(labels) :] + labels[: rnd % len(labels)]:
                wrapped, app, body = cases[label]
                with_plugin = await per_request_s(wrapped, body, n)
                without = await per_request_s(app, body, n)
                added[label].append((with_plugin - without) * 1e6)
                bare[label].append(without * 1e6)
        profiles = {}
        for label in labels:
            wrapped, _, body = cases[label]
            prof = cProfile.Profile()
            prof.enable()
            await per_request_s(wrapped, body, n)
            prof.disable()
            profiles[label] = top_functions(prof, n)
        return {
            label: {
                "added_us": spread(added[label]),
                "added_us_rounds": [round(x, 2) for x in added[label]],
                "fake_app_us": round(statistics.median(bare[label]), 2),
                "profile_top_own_us": profiles[label],
            }
            for label in labels
        }

    scenarios = asyncio.run(measure())
    return {
        "rounds": rounds,
        "requests_per_round": n,
        "scenarios": scenarios,
        "background": background_passes(work),
    }


def background_passes(
    work: Path,
    sizes: tuple[int, ...] = (1, 8, 64, 1000, 10000),
    passes: int = 5,
    lazy_from: int = 10000,
    lazy_loaded: int = 60,
) -> Any:
    """Per steady-state reconcile pass and canary pass, per registry size: the wall time
    (threads and waits included) and the event-loop thread's own CPU time (what requests
    wait behind). Every name preloaded, except from ``lazy_from`` names: preload ``none``
    with ``lazy_loaded`` names loaded by a request (the 10,000-name server of scale.py)."""
    from scale import clone_names, name_of

    from agent_finetune.registry import Registry
    from agent_finetune.training.numpy_adapter import write_adapter
    from server_plugin.cache import AdapterCache, Limits
    from server_plugin.canary_router import CanaryRouter
    from server_plugin.reconciler import Reconciler
    from server_plugin.settings import Settings

    source = write_adapter(work / "bg-adapter")
    out = {}
    for size in sizes:
        registry = Registry(work / f"bg-registry-{size}")
        registry.publish(name_of(0), source)
        clone_names(registry, name_of(0), 1, size)

        async def run(registry: Registry = registry, size: int = size) -> dict[str, Any]:
            lazy = size >= lazy_from
            rec = Reconciler(
                registry,
                AdapterCache(work / f"bg-cache-{size}", Limits()),
                DictTransport(),
                Settings(preload="none" if lazy else "all"),
                engine_bound=lazy_loaded + 4 if lazy else None,
            )
            canary = CanaryRouter(registry)
            await rec.reconcile_once()  # loads every preloaded name (the fake transport)
            for i in range(lazy_loaded if lazy else 0):
                assert await rec.ensure(name_of(i)) is None
            await canary.pass_once()
            samples: dict[str, list[float]] = {}
            for _ in range(passes):
                for what, call in (("reconcile", rec.reconcile_once), ("canary", canary.pass_once)):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    await call()
                    samples.setdefault(f"{what}_wall_ms", []).append(
                        (time.perf_counter() - t0) * 1e3
                    )
                    samples.setdefault(f"{what}_loop_cpu_ms", []).append(
                        (time.thread_time() - c0) * 1e3
                    )
            row = {k: round(statistics.median(v), 3) for k, v in samples.items()}
            loop_ms = row["reconcile_loop_cpu_ms"] + row["canary_loop_cpu_ms"]
            # The longest the loop could not answer anything during 3 passes (a 1 ms ticker's
            # worst lateness), then what the loop thread ran in one more (cProfile sees this
            # thread only, and slows it: its times are relative).
            stalls: list[float] = []
            done = asyncio.Event()
            tick = asyncio.create_task(ticker(done, stalls))
            for _ in range(3):
                await rec.reconcile_once()
            done.set()
            await tick
            prof = cProfile.Profile()
            prof.enable()
            await rec.reconcile_once()
            prof.disable()
            return {
                **row,
                "worst_loop_stall_ms": round(max(stalls) * 1e3, 2),
                "loop_profile_top_own_ms": top_functions(prof, 1, top=5, scale=1e3),
                "loop_share_at_resync_1s": round(loop_ms / 1e3, 5),
                "passes": passes,
                "loaded_names": lazy_loaded if lazy else size,
            }

        out[str(size)] = asyncio.run(run())
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def top_functions(
    prof: cProfile.Profile, n: int, top: int = 6, scale: float = 1e6
) -> list[list[Any]]:
    """The functions with the most own time per request (us; ``scale`` 1e3: ms), outside
    this file's fakes."""
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, calls, own, _cum, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if file.endswith("middleware_body.py"):
            continue
        rows.append([f"{Path(file).name}:{line}({fn})", round(own / n * scale, 2), calls / n])
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def print_request_path(result: dict[str, Any]) -> None:
    print(
        f"plugin code per request, us over the bare app (median, min-max of "
        f"{result['rounds']} rounds x {result['requests_per_round']} requests):"
    )
    for label, r in result["scenarios"].items():
        a = r["added_us"]
        top = ", ".join(f"{f} {us}" for f, us, _ in r["profile_top_own_us"][:3])
        print(f"  {label:42s} {a['median']:7.1f} ({a['min']:.1f}-{a['max']:.1f})   top: {top}")
    print("periodic work (steady state), ms per pass: wall / event-loop thread CPU")
    for size, b in result["background"].items():
        print(
            f"  {size:>5s} names ({b['loaded_names']} loaded): reconcile "
            f"{b['reconcile_wall_ms']:.2f} / "
            f"{b['reconcile_loop_cpu_ms']:.2f}, canary {b['canary_wall_ms']:.2f} / "
            f"{b['canary_loop_cpu_ms']:.2f} ({b['loop_share_at_resync_1s']:.2%} of the loop "
            f"at a 1 s resync); worst loop stall {b['worst_loop_stall_ms']:.1f} ms; top: "
            + ", ".join(f"{f} {ms}" for f, ms, _ in b["loop_profile_top_own_ms"][:3])
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("big-body", "request-path"), default="big-body")
    parser.add_argument("--sizes-mb", default="1,16,32")
    parser.add_argument("--rounds", type=int, default=7, help="request-path rounds")
    parser.add_argument("--requests", type=int, default=3000, help="request-path, per round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.part == "request-path":
        result = request_path(args.rounds, args.requests)
        print_request_path(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
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
