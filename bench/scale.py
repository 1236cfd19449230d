"""Scale benchmark: a registry of 10,000 names, lazy loading, random-name traffic, replicas.

Parts (``--parts``, all by default), side by side in one run:

- ``registry``: publish latency, ``names()``, ``entries()`` and ``agent-finetune list`` at
  100 / 1,000 / 10,000 names (one registry grown in steps; the small sizes are the baseline).
- ``server``: plugin start-up (``startup_seconds`` in ``/v1/adapters``: registry scan,
  preloads) and time to ready, on an empty registry against 10,000 names, lazy
  (``AGENT_FINETUNE_PRELOAD=none``) and preloading (the bounded default).
- ``traffic`` (on the lazy 10,000-name server): first request to cold names (p50/p95), the
  same names warm, then 2,000 random-name requests, uniform and Zipf-skewed: hit rate,
  latency, failed requests, resident memory of the server's processes and cache bytes
  against the bounds (``--max-cpu-loras`` x adapter size, ``AGENT_FINETUNE_CACHE_MAX_BYTES``).
- ``profile``: what a publish and ``agent-finetune list`` spend their time on at the
  largest size: every ``os.fsync`` of ``--profile-publishes`` real publishes counted and
  timed (beside the whole publish), a cProfile of them, and a cProfile of ``list`` run
  in-process (index warm, output discarded), by function, cumulative and own time.
- ``replicas``: 3 servers with the plugin on one registry; time from ``promote`` until
  each replica serves the new version (its ``/v1/adapters`` says live, checked by a chat
  request naming it), p50/p95 for the first 2 and for all 3 replicas, inotify and polling.

Adapters are real PEFT LoRA adapters for the tiny local model
(``agent_finetune.training.tiny_model``), each name published from one of a few weight sets.

    PYTHONPATH=$PWD .venv/bin/python bench/scale.py --json bench/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "How do I reset my password?"
SETTINGS = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
VLLM_ARGS = ["--max-model-len", "256", "--dtype", "bfloat16"]
N_WEIGHTS = 8  # distinct weight sets; names cycle through them


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def p50_p95(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p95": pct(values, 95), "n": len(values)}


def name_of(i: int) -> str:
    return f"tenant-{i:05d}"


# -- registry ---------------------------------------------------------------------------
def clone_names(registry: Any, template: str, start: int, stop: int) -> None:
    """Add names ``start..stop-1`` as copies of ``template``'s folder: its version files
    hard-linked (immutable), its pointer and history copied. A registry of 10,000 names in
    a minute, where 10,000 real publishes take ~15 min on this disk (fsync-bound); the
    publish latency is measured separately, by real publishes."""
    import shutil

    src = registry.name_dir(template)
    for i in range(start, stop):
        dest = registry.root / name_of(i)
        if dest.exists():
            continue
        tmp = registry.root / f".clone-{i}"
        shutil.copytree(src / "versions", tmp / "versions", copy_function=os.link)
        shutil.copy(src / "current", tmp / "current")
        shutil.copy(src / "history.jsonl", tmp / "history.jsonl")
        os.rename(tmp, dest)


def fsync_s(folder: Path, n: int = 50) -> list[float]:
    """This disk's fsync latency: what a publish (about 10 fsyncs) is made of."""
    out = []
    path = folder / ".fsync-probe"
    for _ in range(n):
        t0 = time.perf_counter()
        with path.open("w") as f:
            f.write("x")
            f.flush()
            os.fsync(f.fileno())
        out.append(time.perf_counter() - t0)
    path.unlink()
    return out


def time_it(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def registry_part(work: Path, weights: list[Path], sizes: list[int]) -> list[dict[str, Any]]:
    from agent_finetune.registry import Registry
    from agent_finetune.registry.index import INDEX, listing

    registry = Registry(work / "registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    if not registry.names():
        registry.publish(name_of(0), weights[0], reason="bench")
    env = {**os.environ, "AGENT_FINETUNE_REGISTRY": str(registry.root)}
    cli = [sys.executable, "-m", "agent_finetune.cli"]
    rng = random.Random(0)
    rows = []
    for size in sizes:
        t0 = time.perf_counter()
        clone_names(registry, name_of(0), 1, size)
        build_s = time.perf_counter() - t0
        # New versions of random existing names, made current: the publish a team runs.
        publish_s = []
        for _ in range(100):
            name, source = name_of(rng.randrange(size)), weights[rng.randrange(len(weights))]
            t0 = time.perf_counter()
            registry.publish(name, source)
            publish_s.append(time.perf_counter() - t0)
        (registry.root / INDEX).unlink(missing_ok=True)
        cold = time_it(lambda: listing(registry))  # rebuilds the index
        time.sleep(2.5)  # past the index's racy window, as any later `list` is
        listing(registry)
        rows.append(
            {
                "names": size,
                "clone_s": build_s,
                "fsync_s": p50_p95(fsync_s(registry.root)),
                "publish_s": p50_p95(publish_s),
                "names_s": min(time_it(registry.names) for _ in range(3)),
                "entries_s (every manifest)": time_it(registry.entries),
                "listing_s (index rebuilt)": cold,
                "listing_s (index)": min(time_it(lambda: listing(registry)) for _ in range(3)),
                "cli_version_s (interpreter + imports)": min(
                    time_it(lambda: subprocess.run([*cli, "--version"], env=env, check=True))
                    for _ in range(3)
                ),
                "cli_list_s": min(
                    time_it(
                        lambda: subprocess.run(
                            [*cli, "list"], env=env, check=True, capture_output=True
                        )
                    )
                    for _ in range(3)
                ),
            }
        )
        print_rows("registry", [rows[-1]])
    return rows


# -- servers -----------------------------------------------------------------------------
def group_rss_bytes(pid: int) -> int:
    """Resident memory of every process in the server's process group (API server,
    engine core, workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid != pid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def start(
    model: Path, registry: Path, work: Path, tag: str, settings: dict[str, str], **kw: Any
) -> Any:
    from server_plugin.launch import start_server

    return start_server(
        str(model),
        registry,
        log_path=work / f"{tag}.log",
        settings={
            **SETTINGS,
            "AGENT_FINETUNE_CACHE_DIR": str(work / f"cache-{tag}"),
            **settings,
        },
        extra_args=VLLM_ARGS,
        wait=False,
        **kw,
    )


def ready(server: Any) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    server.wait_ready(900)
    return time.perf_counter() - t0, server.get_json("/v1/adapters", timeout=60)


def startup_row(tag: str, names: int, policy: str, spawned: float, server: Any) -> dict[str, Any]:
    _, status = ready(server)
    return {
        "server": tag,
        "names": names,
        "preload": status["preload"]["policy"],
        "setting": policy,
        "plugin_startup_s": status.get("startup_seconds"),
        "ready_s": time.perf_counter() - spawned,
        "loaded_at_start": sum(a["state"] == "live" for a in status["data"]),
        "rss_bytes": group_rss_bytes(server.process.pid),
        "cache_bytes": status.get("cache_bytes"),
        "pass_s": status.get("last_pass_seconds"),
    }


def chat(client: Any, model: str) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=1, temperature=0
    )
    return str(r.model)


def traffic(server: Any, names: list[str], n: int, clients: int) -> dict[str, Any]:
    """``n`` requests naming ``names`` (in order), from ``clients`` threads."""
    from openai import OpenAI

    before = server.get_json("/v1/adapters", timeout=60)["preload"]
    queue = list(enumerate(names[:n]))
    lock = threading.Lock()
    lat: list[float] = []
    failed: list[str] = []
    peak = {"rss": 0}

    def worker() -> None:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
        while True:
            with lock:
                if not queue:
                    return
                i, name = queue.pop(0)
            t0 = time.perf_counter()
            try:
                served = chat(client, name)
                if not served.startswith(name + "@"):
                    raise AssertionError(f"{name} answered as {served}")
                with lock:
                    lat.append(time.perf_counter() - t0)
            except Exception as e:
                with lock:
                    failed.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            if i % 100 == 0:
                peak["rss"] = max(peak["rss"], group_rss_bytes(server.process.pid))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = server.get_json("/v1/adapters", timeout=60)
    after = status["preload"]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {
        "requests": n,
        "failed": len(failed),
        "failures": failed[:5],
        "hit_rate": hits / max(1, hits + misses),
        "latency_s": p50_p95(lat),
        "peak_rss_bytes": max(peak["rss"], group_rss_bytes(server.process.pid)),
        "cache_bytes": status["cache_bytes"],
        "lazy_loaded": after["lazy_loaded"],
        "lazy_capacity": after["lazy_capacity"],
        "engine_bound": after["engine_bound"],
    }


def zipf_names(n_names: int, n: int, s: float, rng: random.Random) -> list[str]:
    weights = [1.0 / (k + 1) ** s for k in range(n_names)]
    order = list(range(n_names))
    rng.shuffle(order)  # popular names spread over the registry, not its first folders
    return [name_of(order[k]) for k in rng.choices(range(n_names), weights=weights, k=n)]


def server_part(
    work: Path,
    model: Path,
    registry: Path,
    n_names: int,
    args: argparse.Namespace,
    traffic_too: bool = True,
) -> dict[str, Any]:
    """Start-up: empty vs lazy vs preload; then (``traffic_too``) traffic on the lazy one."""
    empty = work / "empty-registry"
    empty.mkdir(exist_ok=True)
    (empty / ".agent-finetune-registry").touch()
    out: dict[str, Any] = {"startup": []}
    bounds = {
        "AGENT_FINETUNE_CACHE_MAX_BYTES": str(args.cache_max_bytes),
        "AGENT_FINETUNE_CACHE_GRACE_S": "10",
        "AGENT_FINETUNE_MAX_LOADS": "2",
    }
    baselines = (
        ()
        if args.lazy_only
        else (
            ("empty", empty, 0, "auto"),
            ("preload-10k", registry, n_names, "auto"),
        )
    )
    for tag, reg, names, policy in baselines:
        t0 = time.perf_counter()
        server = start(model, reg, work, tag, {**bounds, "AGENT_FINETUNE_PRELOAD": policy})
        try:
            out["startup"].append(startup_row(tag, names, policy, t0, server))
        finally:
            server.stop()
        print_rows("server start-up", [out["startup"][-1]])
    t0 = time.perf_counter()
    server = start(model, registry, work, "lazy-10k", {**bounds, "AGENT_FINETUNE_PRELOAD": "none"})
    try:
        out["startup"].append(startup_row("lazy-10k", n_names, "none", t0, server))
        print_rows("server start-up", [out["startup"][-1]])
        if not traffic_too:
            return out
        out["models_listed"] = len(server.get_json("/v1/models", timeout=60)["data"])
        rng = random.Random(1)
        cold = rng.sample(range(n_names), 40)
        out["cold"] = traffic(server, [name_of(i) for i in cold], 40, 1)
        out["warm"] = traffic(server, [name_of(i) for i in cold], 40, 1)
        print_rows("first request: cold, then warm", [out["cold"], out["warm"]])
        uniform = [name_of(rng.randrange(n_names)) for _ in range(args.requests)]
        out["uniform"] = traffic(server, uniform, args.requests, args.clients)
        print_rows("random names, uniform", [out["uniform"]])
        zipf = zipf_names(n_names, args.requests, 1.1, rng)
        out["zipf"] = traffic(server, zipf, args.requests, args.clients)
        print_rows("random names, Zipf s=1.1", [out["zipf"]])
        out["adapter_bytes"] = sum(
            f.stat().st_size for f in (registry / name_of(0) / "versions" / "v0001").iterdir()
        )
    finally:
        server.stop()
    return out


# -- replicas ----------------------------------------------------------------------------
def converge_once(
    servers: list[Any], clients: list[Any], registry: Any, name: str, version: str
) -> list[float]:
    """Promote, then per replica: seconds until it answers as ``name@version``."""
    want = f"{name}@{version}"
    times: list[float | None] = [None] * len(servers)
    t0 = time.perf_counter()
    registry.promote(name, version)

    def watch(k: int) -> None:
        while time.perf_counter() - t0 < 60:
            live: dict[str, Any] = next(
                (a for a in servers[k].get_json("/v1/adapters")["data"] if a["name"] == name), {}
            )
            if live.get("live") == version:
                times[k] = time.perf_counter() - t0
                break
            time.sleep(0.01)
        assert chat(clients[k], name) == want, f"replica {k} does not answer as {want}"

    threads = [threading.Thread(target=watch, args=(k,)) for k in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(t is None for t in times):
        raise TimeoutError(f"not every replica served {want} within 60 s: {times}")
    return [float(t) for t in times if t is not None]


def replicas_part(
    work: Path, model: Path, weights: list[Path], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from openai import OpenAI

    from agent_finetune.registry import Registry

    rows = []
    for mode in ("inotify", "polling"):
        registry = Registry(work / f"replica-registry-{mode}")
        registry.root.mkdir(parents=True, exist_ok=True)
        name = "fleet"
        for i in range(args.promotes + 1):
            registry.publish(name, weights[i % len(weights)], make_current=i == 0)
        settings = {"AGENT_FINETUNE_RESYNC_S": str(args.resync)}
        if mode == "polling":
            settings["AGENT_FINETUNE_POLLING"] = "1"
        n = args.replicas if mode == "inotify" else args.polling_replicas
        servers = [
            start(model, registry.root, work, f"replica-{mode}-{k}", settings) for k in range(n)
        ]
        try:
            for s in servers:
                s.wait_ready(900)
            clients = [
                OpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=60) for s in servers
            ]
            two, three = [], []
            for i in range(1, args.promotes + 1):
                times = converge_once(servers, clients, registry, name, f"v{i + 1:04d}")
                two.append(max(times[:2]))
                three.append(max(times))
                time.sleep(0.2)
            status = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agent_finetune.cli",
                    "status",
                    "--max-lag",
                    "5",
                    *[x for s in servers for x in ("--server", s.url)],
                ],
                capture_output=True,
                text=True,
            )
            rows.append(
                {
                    "watch": mode,
                    "resync_s": args.resync,
                    "promotes": args.promotes,
                    "every_of_2_s": p50_p95(two),
                    "replicas": n,
                    f"every_of_{n}_s": p50_p95(three),
                    "status_exit": status.returncode,
                    "status_last_line": status.stdout.strip().splitlines()[-1],
                }
            )
            print_rows("replica convergence (promote -> every replica serves it)", [rows[-1]])
        finally:
            for s in servers:
                s.stop()
    return rows


# -- request path ---------------------------------------------------------------------
def middleware_us(work: Path, weights: list[Path], n: int = 20000) -> dict[str, float]:
    """Per-request cost of the plugin's request-path code on a typical chat body, against
    calling the app directly: under ``all`` (scan for ``@``) and under a lazy policy
    (parse the model, find it served), in microseconds."""
    import asyncio

    from middleware_body import DictTransport

    from agent_finetune.registry import Registry
    from server_plugin.cache import AdapterCache, Limits
    from server_plugin.middleware import ModelRequestMiddleware
    from server_plugin.reconciler import Reconciler
    from server_plugin.settings import Settings

    registry = Registry(work / "middleware-registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    if not registry.names():
        registry.publish("tenant", weights[0])
    body = json.dumps(
        {"model": "tenant", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}
    ).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": ""}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def cost(policy: str) -> float:
        rec = Reconciler(
            registry,
            AdapterCache(work / f"middleware-cache-{policy}", Limits()),
            DictTransport(),
            Settings(preload=policy),
        )
        await rec.reconcile_once()
        await rec.ensure("tenant")
        plugin = type(
            "Plugin", (), {"reconciler": rec, "max_parse_bytes": 1 << 20, "canary": None}
        )()
        wrapped = ModelRequestMiddleware(app, plugin)  # type: ignore[arg-type]

        async def timed(call: Any) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                await call(scope, receive, send)
            return time.perf_counter() - t0

        return (await timed(wrapped) - await timed(app)) / n * 1e6

    return {"all_us": asyncio.run(cost("all")), "lazy_us": asyncio.run(cost("none"))}


# -- profile ----------------------------------------------------------------------------
def profile_part(work: Path, weights: list[Path], size: int, publishes: int) -> dict[str, Any]:
    """fsyncs per publish (count and seconds) and cProfiles of publish and ``list``."""
    import cProfile
    import io
    import pstats
    from contextlib import redirect_stdout

    from agent_finetune.cli.app import main as cli_main
    from agent_finetune.registry import Registry

    registry = Registry(work / "registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    if not registry.names():
        registry.publish(name_of(0), weights[0], reason="bench")
    clone_names(registry, name_of(0), 1, size)
    real_fsync = os.fsync
    fsyncs: list[float] = []

    def timed_fsync(fd: Any) -> None:
        t0 = time.perf_counter()
        real_fsync(fd)
        fsyncs.append(time.perf_counter() - t0)

    rng = random.Random(1)
    rows = []
    prof = cProfile.Profile()
    os.fsync = timed_fsync
    try:
        for _ in range(publishes):
            name, source = name_of(rng.randrange(size)), weights[rng.randrange(len(weights))]
            fsyncs.clear()
            t0 = time.perf_counter()
            prof.enable()
            registry.publish(name, source)
            prof.disable()
            total = time.perf_counter() - t0
            rows.append({"total_s": total, "fsyncs": len(fsyncs), "fsync_s": sum(fsyncs)})
    finally:
        os.fsync = real_fsync
    publish = {
        "publishes": publishes,
        "total_s": p50_p95([r["total_s"] for r in rows]),
        "fsync_seconds_per_publish": p50_p95([r["fsync_s"] for r in rows]),
        "fsyncs_per_publish": sorted({r["fsyncs"] for r in rows}),
        "fsync_fraction_median": statistics.median(r["fsync_s"] / r["total_s"] for r in rows),
        "profile": profile_rows(pstats.Stats(prof, stream=io.StringIO()), publishes),
    }
    publish["fsync_5_files"] = fsync_batch(registry.root)
    print_rows("publish: fsyncs", [{k: v for k, v in publish.items() if k != "profile"}])
    argv = ["list", "--registry", str(registry.root)]
    for _ in range(2):  # the index current and past its racy window, as any later `list`
        with redirect_stdout(io.StringIO()):
            cli_main(argv)
        time.sleep(2.5)
    prof = cProfile.Profile()
    listed = []
    for _ in range(3):
        sink = io.StringIO()
        t0 = time.perf_counter()
        with redirect_stdout(sink):
            prof.enable()
            cli_main(argv)
            prof.disable()
        listed.append(time.perf_counter() - t0)
    lines = sink.getvalue().count("\n")
    listing = {
        "names": size,
        "rows_printed": lines,
        "in_process_s": p50_p95(listed),
        "profile": profile_rows(pstats.Stats(prof, stream=io.StringIO()), len(listed)),
    }
    print_rows("list, in-process", [{k: v for k, v in listing.items() if k != "profile"}])
    parts: tuple[tuple[str, dict[str, Any]], ...] = (("publish", publish), ("list", listing))
    for what, part in parts:
        print(f"  {what}: top cumulative (ms per call)")
        for r in part["profile"]["cumulative"][:12]:
            print(f"    {r[1]:9.1f} ms  {r[0]}  ({r[2]:.0f} calls)")
    return {"publish": publish, "list": listing}


def fsync_batch(root: Path, files: int = 5, reps: int = 20) -> dict[str, Any]:
    """fsync of ``files`` freshly written small files (what a publish's staging folder
    holds before its rename), one after the other against all at once on threads: whether
    the filesystem's journal folds concurrent fsyncs into one commit."""
    from concurrent.futures import ThreadPoolExecutor

    folder = root / ".fsync-batch"
    folder.mkdir(exist_ok=True)
    out: dict[str, list[float]] = {"sequential": [], "threads": []}
    with ThreadPoolExecutor(files) as pool:
        for rep in range(reps):
            for how in ("sequential", "threads") if rep % 2 else ("threads", "sequential"):
                fds = []
                for i in range(files):
                    fd = os.open(folder / f"{how}-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.write(fd, os.urandom(4096))
                    fds.append(fd)
                t0 = time.perf_counter()
                if how == "threads":
                    list(pool.map(os.fsync, fds))
                else:
                    for fd in fds:
                        os.fsync(fd)
                out[how].append(time.perf_counter() - t0)
                for fd in fds:
                    os.close(fd)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return {how: p50_p95(v) for how, v in out.items()}


def profile_rows(st: Any, calls: int, top: int = 25) -> dict[str, list[list[Any]]]:
    """Functions by cumulative and by own time, ms per profiled call."""
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})"
        rows.append([where, round(ct / calls * 1e3, 2), nc / calls, round(tt / calls * 1e3, 2)])
    cumulative = sorted(rows, key=lambda r: -r[1])[:top]
    own = sorted(rows, key=lambda r: -r[3])[:top]
    return {
        "cumulative": [[r[0], r[1], r[2]] for r in cumulative],
        "own": [[r[0], r[3], r[2]] for r in own],
    }


# -- output -----------------------------------------------------------------------------
def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title}")
    for row in rows:
        flat: dict[str, Any] = {}
        _flat("", row, flat)
        print(
            "  ".join(
                f"{k}={v * 1000:.1f}ms"
                if isinstance(v, float) and ("_s" in k or k.endswith(("p50", "p95")))
                else f"{k}={v}"
                for k, v in flat.items()
            )
        )
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts",
        default="registry,middleware,server,replicas",
        help="comma-separated; `startup` is `server` without the traffic",
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="registry sizes")
    parser.add_argument("--requests", type=int, default=2000, help="random-name requests")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument(
        "--cache-max-bytes", type=int, default=64 << 20, help="AGENT_FINETUNE_CACHE_MAX_BYTES"
    )
    parser.add_argument(
        "--lazy-only", action="store_true", help="server part: only the lazy 10,000-name server"
    )
    parser.add_argument("--replicas", type=int, default=3, help="replicas watching by inotify")
    parser.add_argument("--polling-replicas", type=int, default=2, help="replicas polling")
    parser.add_argument("--promotes", type=int, default=10)
    parser.add_argument("--profile-publishes", type=int, default=30, help="profile part")
    parser.add_argument("--resync", type=float, default=2.0, help="AGENT_FINETUNE_RESYNC_S")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: temp)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "scale.json"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent_finetune.training.tiny_model import build_tiny_model, random_adapter

    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    weights = []
    for i in range(N_WEIGHTS):
        out = work / f"weights{i}"
        if not (out / "adapter_config.json").is_file():
            random_adapter(model, out, seed=2000 + i)
        weights.append(out)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]},
    }
    sizes = [int(s) for s in args.sizes.split(",")]

    def save() -> None:
        report["machine"]["loadavg_1m_now"] = os.getloadavg()[0]
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    if "registry" in parts:
        report["registry"] = registry_part(work, weights, sizes)
        save()
    if "profile" in parts:
        report["profile"] = profile_part(work, weights, sizes[-1], args.profile_publishes)
        save()
    if "middleware" in parts:
        report["middleware"] = middleware_us(work, weights)
        print_rows("request-path cost of the plugin", [report["middleware"]])
        save()
    if "server" in parts or "startup" in parts:
        from agent_finetune.registry import Registry

        registry = Registry(work / "registry")
        if not registry.names():
            registry.publish(name_of(0), weights[0])
        clone_names(registry, name_of(0), 1, sizes[-1])
        report["server"] = server_part(
            work, model, registry.root, sizes[-1], args, traffic_too="server" in parts
        )
        save()
    if "replicas" in parts:
        report["replicas"] = replicas_part(work, model, weights, args)
        save()
    save()
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
