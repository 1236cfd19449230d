"""Safe-rollout benchmark: canary split, routing cost, guard trip time, gate agreement.

Parts (tiny local model, CPU is fine; each part prints a table and merges into --json):

- ``routing``: in-process, the plugin's router on a real registry. Split accuracy over
  1,000 draws per weight (random and sticky users), and the middleware's per-request
  routing cost in microseconds (the middleware's parse, route, rewrite, and the send wrapper
  watching the answer), side by side with the same
  call when no canary runs (the baseline every request pays today).
- ``server``: a real vLLM CPU server with the plugin. 1,000 requests at weight 10: the
  observed share; each request's own latency (to put the routing cost in proportion); then
  guard trips: a negative score posted to the feedback route trips the guard, and we time
  until (a) this server answers from the current version and (b) a second replica (the same
  router and registry watcher as the plugin, in this process) stops routing to the
  candidate. p50/p95 over --trips.
- ``gate``: --runs seeded runs; each trains one version on the right answers and one on a
  shuffled copy (seeded LoRA init, data order and shuffle), then gates each against the
  other offline (PEFT, loglik) on held-out paraphrases. Agreement: the gate promotes the
  right-answer version over the shuffled one and refuses the reverse.

    python bench/canary.py --part routing --part server --part gate --json bench/canary.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "agent_finetune" / "assets"
NAME = "bench"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def table(rows: list[tuple[Any, ...]], headers: list[str]) -> None:
    from agent_finetune.cli.output import print_table

    print_table(rows, headers)
    print()


def registry_with_two_versions(root: Path, model: Path | None = None) -> Any:
    from agent_finetune.registry import Registry

    reg = Registry(root)
    for seed in range(2):
        if model is None:
            from agent_finetune.training.numpy_adapter import write_adapter

            src = write_adapter(root.parent / f"src{seed}", seed=seed)
        else:
            from agent_finetune.training.tiny_model import random_adapter

            src = random_adapter(model, root.parent / f"src{seed}", seed=seed)
        reg.publish(NAME, src, make_current=seed == 0)
    return reg


# -- routing (in-process) ----------------------------------------------------------------------


def bench_routing(n: int, cost_iters: int) -> dict[str, Any]:
    from agent_finetune.registry.canary_state import finish_canary, start_canary
    from server_plugin.canary_router import CanaryRouter

    work = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    try:
        reg = registry_with_two_versions(work / "registry")
        split = []
        for weight in (1, 5, 10, 25, 50):
            c = start_canary(reg, NAME, "v0002", weight=weight)
            router = CanaryRouter(reg, rng=random.Random(weight))
            router.refresh()
            rand = sum(router.choose(NAME, None).candidate for _ in range(n)) / n * 100  # type: ignore[union-attr]
            sticky = sum(router.choose(NAME, f"user-{i}").candidate for i in range(n)) / n * 100  # type: ignore[union-attr]
            split.append({"weight": weight, "random": rand, "sticky": sticky})
            finish_canary(reg, NAME, "abort", reason="bench", canary_id=c.id)
        table(
            [(s["weight"], f"{s['random']:.1f}", f"{s['sticky']:.1f}") for s in split],
            ["WEIGHT %", f"RANDOM % ({n} req)", f"STICKY % ({n} users)"],
        )
        body = json.dumps(
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "How do I reset my password?"}],
                "max_tokens": 16,
                "temperature": 0,
                "user": "agent-7",
            }
        ).encode()

        async def noop(message: Any) -> None:
            return None

        reply = json.dumps(
            {"id": "chatcmpl-x", "object": "chat.completion", "model": f"{NAME}@v0001"}
        ).encode()

        async def one(router: Any) -> None:
            from server_plugin.middleware import mentions, parse_body, serialise

            if not router.active or not mentions(body, router.names):
                return
            data = parse_body(body)
            route = router.route(data, []) if data is not None else None
            if route is not None:
                if route.candidate:
                    serialise(router.pinned(data, route))
                send, _finish = router.wrap_send(route, noop, time.perf_counter())
                await send({"type": "http.response.start", "status": 200})
                await send({"type": "http.response.body", "body": reply})

        def cost(router: Any) -> tuple[float, float]:
            """(wall, CPU) microseconds per request. CPU time leaves out the time this
            process waits for a core: on a shared, loaded machine that is the stable one."""

            async def loop() -> tuple[float, float]:
                t, c = time.perf_counter(), time.process_time()
                for _ in range(cost_iters):
                    await one(router)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                return wall / cost_iters * 1e6, cpu / cost_iters * 1e6

            return asyncio.run(loop())

        idle = CanaryRouter(reg)
        idle.refresh()
        c = start_canary(reg, NAME, "v0002", weight=10, guards=_no_trip())
        active = CanaryRouter(reg)
        active.refresh()
        rounds = [(cost(idle), cost(active)) for _ in range(5)]
        idle_us = [statistics.median(r[0][i] for r in rounds) for i in (0, 1)]
        active_us = [statistics.median(r[1][i] for r in rounds) for i in (0, 1)]
        finish_canary(reg, NAME, "abort", reason="bench", canary_id=c.id)
        table(
            [
                ("no canary (baseline)", f"{idle_us[0]:.2f}", f"{idle_us[1]:.2f}"),
                ("canary at 10%", f"{active_us[0]:.2f}", f"{active_us[1]:.2f}"),
            ],
            ["ROUTER", "WALL US / REQUEST", "CPU US / REQUEST"],
        )
        return {
            "split": split,
            "requests": n,
            "cost_us": {
                "idle": {"wall": idle_us[0], "cpu": idle_us[1]},
                "canary": {"wall": active_us[0], "cpu": active_us[1]},
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _no_trip() -> Any:
    from agent_finetune.registry.canary_state import Guards

    return Guards(min_requests=10**9, min_feedback=10**9, duration_s=10**9)


# -- server ------------------------------------------------------------------------------------


def _post(url: str, body: Any) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


def bench_server(n: int, trips: int, resync_s: float) -> dict[str, Any]:
    from agent_finetune.registry.canary_state import Guards, read_canary, start_canary
    from agent_finetune.training.tiny_model import build_tiny_model
    from server_plugin.launch import start_server

    work = Path(tempfile.mkdtemp(prefix="bench-canary-server-"))
    model = build_tiny_model(work / "tiny")
    reg = registry_with_two_versions(work / "registry", model)
    server = start_server(
        str(model),
        reg.root,
        log_path=work / "vllm.log",
        settings={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "AGENT_FINETUNE_RESYNC_S": str(resync_s),
            "AGENT_FINETUNE_CACHE_DIR": str(work / "cache"),
        },
        extra_args=["--max-model-len", "256", "--dtype", "bfloat16"],
        wait=False,
    )
    try:
        server.wait_ready(900)
        url = server.base_url + "/chat/completions"

        def chat(user: str | None = None) -> tuple[str, str, float]:
            body: dict[str, Any] = {
                "model": NAME,
                "messages": [{"role": "user", "content": "How do I reset my password?"}],
                "max_tokens": 1,
                "temperature": 0,
            }
            if user:
                body["user"] = user
            t = time.perf_counter()
            r = _post(url, body)
            return r["model"], r["id"], time.perf_counter() - t

        for _ in range(5):
            chat()  # warm up
        plain = [chat()[2] for _ in range(100)]
        c = start_canary(reg, NAME, "v0002", weight=10, guards=_no_trip())
        _wait(lambda: chat()[0] == f"{NAME}@v0002", 30)
        results = [chat() for _ in range(n)]
        share = sum(m == f"{NAME}@v0002" for m, _, _ in results) / n * 100
        lat = [s for _, _, s in results]

        # Guard trips, timed on this server and on a second replica in this process.
        trip_local, trip_replica = [], []
        from agent_finetune.registry.canary_state import finish_canary

        finish_canary(reg, NAME, "abort", reason="bench: next part", canary_id=c.id)
        for i in range(trips):
            replica = _Replica(reg, resync_s)
            guards = Guards(min_requests=10**9, min_feedback=1, max_negative_feedback=0.0)
            c = start_canary(reg, NAME, "v0002", weight=100, guards=guards)
            _wait(lambda: chat()[0] == f"{NAME}@v0002", 30)
            _wait(replica.routes_candidate, 30)
            _, rid, _ = chat(f"trip-{i}")  # weight 100: the candidate answers
            t0 = time.perf_counter()
            _post(server.url + f"/v1/adapters/{NAME}/feedback", {"id": rid, "score": -1})
            _wait(lambda: chat()[0] == f"{NAME}@v0001", 30)
            trip_local.append(time.perf_counter() - t0)
            replica.wait_dropped(30)
            trip_replica.append(replica.dropped_at - t0)  # type: ignore[operator]
            replica.stop()
            assert read_canary(reg, NAME) is None
        out = {
            "requests": n,
            "weight": 10,
            "observed_share": share,
            "request_ms": {"p50": pct(lat, 50) * 1e3, "p95": pct(lat, 95) * 1e3},
            "request_ms_no_canary": {"p50": pct(plain, 50) * 1e3, "p95": pct(plain, 95) * 1e3},
            "trip_s": {
                "this_server": {"p50": pct(trip_local, 50), "p95": pct(trip_local, 95)},
                "other_replica": {"p50": pct(trip_replica, 50), "p95": pct(trip_replica, 95)},
                "trips": trips,
                "resync_s": resync_s,
            },
        }
        rq, rq0 = out["request_ms"], out["request_ms_no_canary"]
        table(
            [
                ("share at weight 10%", f"{share:.1f}% of {n}"),
                ("request p50 / p95, canary", f"{rq['p50']:.1f} / {rq['p95']:.1f} ms"),
                ("request p50 / p95, no canary", f"{rq0['p50']:.1f} / {rq0['p95']:.1f} ms"),
                (
                    "trip -> 100% current, this server p50 / p95",
                    f"{pct(trip_local, 50):.3f} / {pct(trip_local, 95):.3f} s",
                ),
                (
                    "trip -> 100% current, other replica p50 / p95",
                    f"{pct(trip_replica, 50):.3f} / {pct(trip_replica, 95):.3f} s",
                ),
            ],
            ["SERVER", "RESULT"],
        )
        return out
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


class _Replica:
    """A second replica's canary router: the plugin's router, loop and registry watcher."""

    def __init__(self, reg: Any, resync_s: float) -> None:
        from server_plugin.canary_router import CanaryRouter
        from server_plugin.watcher import RegistryWatcher

        self.router = CanaryRouter(reg)
        self.dropped_at: float | None = None
        self.loop = asyncio.new_event_loop()
        self.watcher = RegistryWatcher(reg.root, self.router.wake)
        self.thread = threading.Thread(target=self._run, args=(resync_s,), daemon=True)
        self.thread.start()

    def _run(self, resync_s: float) -> None:
        asyncio.set_event_loop(self.loop)
        self.watcher.start()
        with contextlib.suppress(RuntimeError):
            self.loop.run_until_complete(self.router.run(resync_s))

    def routes_candidate(self) -> bool:
        return self.router.active

    def wait_dropped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.router.active:
            if time.monotonic() > deadline:
                raise TimeoutError("the replica kept the canary")
            time.sleep(0.001)
        self.dropped_at = time.perf_counter()

    def stop(self) -> None:
        self.watcher.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# -- gate agreement ----------------------------------------------------------------------------


def bench_gate(runs: int, steps: int, save: Any = None) -> dict[str, Any]:
    """``save(partial)`` is called after every run, so a long run can be stopped early."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent_finetune.cli.demo import shuffled_copy
    from agent_finetune.registry import Registry
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.gate import gate
    from agent_finetune.training.tiny_model import build_tiny_model
    from agent_finetune.training.train import train

    work = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    right = ASSETS / "support_v1.json"
    heldout = ASSETS / "support_heldout.json"
    base = build_tiny_model(work / "base", corpus_files=[right, ASSETS / "support_v2.json"])
    rows = []
    try:
        for seed in range(runs):
            reg = Registry(work / f"reg{seed}")
            noisy = shuffled_copy(right, work / f"shuffled{seed}.json", seed=seed)
            versions = {}
            t = time.perf_counter()
            for tag, data in (("right", right), ("shuffled", noisy)):
                cfg = FineTuningConfig.from_yaml(
                    ASSETS / "tiny-cpu.yaml",
                    model_name=str(base),
                    output_dir=str(work / f"run{seed}-{tag}"),
                    adapter_name=NAME,
                    registry_dir=str(reg.root),
                    seed=seed,
                    max_steps=steps,
                    logging_steps=1000,
                    promotion={"policy": "never"},
                )
                versions[tag] = train(cfg, data, train_test_split=0.0).published.version  # type: ignore[union-attr]
            train_s = time.perf_counter() - t
            # Live = shuffled, candidate = right: must promote. Then the reverse: must refuse.
            reg.promote(NAME, versions["shuffled"])
            up = gate(reg, NAME, versions["right"], heldout, seed=seed)
            reg.promote(NAME, versions["right"])
            down = gate(reg, NAME, versions["shuffled"], heldout, seed=seed)
            ok = up.promoted and not down.promoted
            c = up.comparison
            assert c is not None
            rows.append(
                {
                    "seed": seed,
                    "agree": ok,
                    "right_loglik": c.candidate,
                    "shuffled_loglik": c.live,
                    "ci": [c.ci_low, c.ci_high],
                    "win_rate": c.win_rate,
                    "train_s": train_s,
                }
            )
            print(
                f"seed {seed}: {'agree' if ok else 'DISAGREE'} right {c.candidate:.3f} vs "
                f"shuffled {c.live:.3f}, CI [{c.ci_low:+.3f}, {c.ci_high:+.3f}], "
                f"win rate {c.win_rate:.0%} ({train_s:.0f}s training)",
                flush=True,
            )
            if save is not None:
                save(
                    {
                        "runs": len(rows),
                        "steps": steps,
                        "agree": sum(r["agree"] for r in rows),
                        "rows": rows,
                        "complete": False,
                    }
                )
        agree = sum(r["agree"] for r in rows)
        table(
            [(f"{agree}/{runs}", steps, f"{statistics.median(r['win_rate'] for r in rows):.0%}")],
            ["GATE PICKS THE RIGHT VERSION", "TRAIN STEPS", "MEDIAN WIN RATE"],
        )
        return {"runs": runs, "steps": steps, "agree": agree, "rows": rows, "complete": True}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", action="append", choices=["routing", "server", "gate"])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--cost-iters", type=int, default=20000)
    p.add_argument("--trips", type=int, default=20)
    p.add_argument("--resync", type=float, default=2.0, help="AGENT_FINETUNE_RESYNC_S")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--steps", type=int, default=15, help="training steps per version (gate)")
    p.add_argument("--json", type=Path, default=None, help="merge results into this file")
    args = p.parse_args()
    results: dict[str, Any] = {}
    if args.json and args.json.is_file():
        results = json.loads(args.json.read_text())
    for part in args.part or ["routing"]:
        print(f"== {part} ==", flush=True)
        if part == "routing":
            results["routing"] = bench_routing(args.requests, args.cost_iters)
        elif part == "server":
            results["server"] = bench_server(args.requests, args.trips, args.resync)
        else:

            def save(partial: dict[str, Any]) -> None:
                if args.json:
                    args.json.write_text(json.dumps({**results, "gate": partial}, indent=2) + "\n")

            results["gate"] = bench_gate(args.runs, args.steps, save)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
