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
import subprocess
import sys
import tempfile
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
def grow(registry: Any, weights: list[Path], start: int, stop: int) -> None:
    for i in range(start, stop):
        registry.publish(name_of(i), weights[i % len(weights)], reason="bench")


def time_it(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def registry_part(work: Path, weights: list[Path], sizes: list[int]) -> list[dict[str, Any]]:
    from agent_finetune.registry import Registry

    registry = Registry(work / "registry-ops")
    registry.root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AGENT_FINETUNE_REGISTRY": str(registry.root)}
    cli = [sys.executable, "-m", "agent_finetune.cli", "list"]
    rng = random.Random(0)
    rows, have = [], 0
    for size in sizes:
        t0 = time.perf_counter()
        grow(registry, weights, have, size)
        build_s, have = time.perf_counter() - t0, size
        # New versions of random existing names, made current: the publish a team runs.
        publish_s = []
        for _ in range(100):
            name, source = name_of(rng.randrange(size)), weights[rng.randrange(len(weights))]
            t0 = time.perf_counter()
            registry.publish(name, source)
            publish_s.append(time.perf_counter() - t0)
        rows.append(
            {
                "names": size,
                "build_s": build_s,
                "publish_s": p50_p95(publish_s),
                "names_s": min(time_it(registry.names) for _ in range(3)),
                "entries_s": min(time_it(registry.entries) for _ in range(3)),
                "cli_list_s": min(
                    time_it(lambda: subprocess.run(cli, env=env, check=True, capture_output=True))
                    for _ in range(3)
                ),
                "cli_list_json_s": min(
                    time_it(
                        lambda: subprocess.run(
                            [*cli, "--json"], env=env, check=True, capture_output=True
                        )
                    )
                    for _ in range(3)
                ),
            }
        )
        print_rows("registry", [rows[-1]])
    return rows


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
                if isinstance(v, float) and k.endswith(("_s", "p50", "p95"))
                else f"{k}={v}"
                for k, v in flat.items()
            )
        )
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="registry,server,traffic,replicas")
    parser.add_argument("--sizes", default="100,1000,10000", help="registry sizes")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: temp)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "scale.json"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent_finetune.training.tiny_model import build_tiny_model, random_adapter

    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    weights = []
    for i in range(N_WEIGHTS):
        out = work / f"weights{i}"
        weights.append(
            out
            if (out / "adapter_config.json").is_file()
            else random_adapter(model, out, seed=2000 + i)
        )
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]},
        "adapter_bytes": sum(f.stat().st_size for f in weights[0].iterdir()),
    }
    if "registry" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        report["registry"] = registry_part(work, weights, sizes)
    report["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
