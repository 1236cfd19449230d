"""Registry latency (publish, promote, list) at 100 and 10,000 names, this code vs the code
before issue 9 (commit 42c98c6), plus the cost of the validator's NaN/Inf scan on a 7B-size
adapter.

Each implementation runs in its own process (the baseline imports the old package from a
`git archive` of the commit in a temp folder), on its own registry in the same folder tree,
same tiny adapter, same sample of names. A registry of N names is built by publishing one
name with the implementation under test and copying that name folder N-1 times (a real
publish per name would spend most of the run in fsync). Then, per operation, K timed calls
on names drawn at random: `publish` (a new version, made current), `promote` (back to
v0001: verify + pointer move), `list` (`entries()` of every name) and `names()`.

    .venv/bin/python bench/registry_ops.py --json bench/registry_ops.json
    .venv/bin/python bench/registry_ops.py --names 100 --ops 50   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "42c98c6"


def _tiny_adapter(folder: Path) -> Path:
    """A one-layer r=4 q_proj/v_proj adapter (hidden 128), written without numpy/torch."""
    folder.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {}
    data = b""
    rng = random.Random(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    for module in ("q_proj", "v_proj"):
        for ab, shape in (("A", [4, 128]), ("B", [128, 4])):
            n = shape[0] * shape[1]
            raw = struct.pack(f"<{n}f", *(rng.uniform(-0.1, 0.1) for _ in range(n)))
            header[f"{prefix}.{module}.lora_{ab}.weight"] = {
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [len(data), len(data) + len(raw)],
            }
            data += raw
    body = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + data)
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-base",
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    p95 = statistics.quantiles(ms, n=20)[-1] if len(ms) >= 2 else ms[0]
    return {"p50_ms": statistics.median(ms), "p95_ms": p95, "n": len(ms)}


def worker(names: int, ops: int, list_reps: int, workdir: Path) -> dict[str, Any]:
    """Run inside the process whose sys.path holds the implementation under test."""
    from agent_finetune.registry import Registry

    adapter = _tiny_adapter(workdir / "adapter")
    root = workdir / "registry"
    reg = Registry(root)
    reg.publish("n00000", adapter)
    for i in range(1, names):
        shutil.copytree(root / "n00000", root / f"n{i:05d}", symlinks=True)
    rng = random.Random(1)
    pick = [f"n{rng.randrange(names):05d}" for _ in range(ops)]
    out: dict[str, Any] = {}
    timings: dict[str, list[float]] = {"publish": [], "promote": [], "list": [], "names": []}
    for name in pick:
        t = time.perf_counter()
        reg.publish(name, adapter)
        timings["publish"].append(time.perf_counter() - t)
    for name in pick:
        t = time.perf_counter()
        reg.promote(name, "v0001")
        timings["promote"].append(time.perf_counter() - t)
    for _ in range(list_reps):
        t = time.perf_counter()
        listed = reg.entries()
        timings["list"].append(time.perf_counter() - t)
        t = time.perf_counter()
        reg.names()
        timings["names"].append(time.perf_counter() - t)
    assert len(listed) == names + len(pick)
    for op, samples in timings.items():
        out[op] = _stats(samples)
    return out


def scan_cost(workdir: Path, dtype: str, repeats: int) -> dict[str, Any]:
    """validate_adapter on a 7B-size r=64 all-linear adapter, without and with the NaN scan."""
    import numpy as np

    from agent_finetune.registry.adapter import linear_shapes, validate_adapter

    base = {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_hidden_layers": 28,
    }
    r, np_dtype = 64, {"F32": np.float32, "F16": np.float16}[dtype]
    folder = workdir / f"adapter-7b-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    shapes = linear_shapes(base)
    header: dict[str, Any] = {}
    sizes = []
    offset = 0
    for layer in range(28):
        for m, (in_f, out_f) in shapes.items():
            group = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            for ab, shape in (("A", [r, in_f]), ("B", [out_f, r])):
                nbytes = shape[0] * shape[1] * np.dtype(np_dtype).itemsize
                key = f"base_model.model.model.layers.{layer}.{group}.{m}.lora_{ab}.weight"
                header[key] = {
                    "dtype": dtype,
                    "shape": shape,
                    "data_offsets": [offset, offset + nbytes],
                }
                sizes.append(shape)
                offset += nbytes
    body = json.dumps(header).encode()
    rng = np.random.default_rng(0)
    with (folder / "adapter_model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for shape in sizes:
            f.write(rng.standard_normal(shape, dtype=np.float32).astype(np_dtype).tobytes())
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 128, "target_modules": list(shapes)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result: dict[str, Any] = {"bytes": offset, "tensors": len(sizes), "dtype": dtype}
    for label, scan in (("checks_only", False), ("with_scan", True)):
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            report = validate_adapter(folder, base_config=base, max_rank=64, scan_values=scan)
            samples.append(time.perf_counter() - t)
            assert report.ok, report.problems
        result[label] = _stats(samples)
    shutil.rmtree(folder)
    return result


def _baseline_tree(tmp: Path) -> Path:
    tree = tmp / "baseline"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "agent_finetune"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _run_worker(pythonpath: Path, names: int, a: argparse.Namespace, workdir: Path) -> Any:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    cmd = [sys.executable, __file__, "--worker", "--names", str(names), "--ops", str(a.ops)]
    cmd += ["--list-reps", str(a.list_reps), "--workdir", str(workdir)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", type=int, nargs="+", default=[100, 10_000])
    p.add_argument("--ops", type=int, default=100, help="timed publishes and promotes per size")
    p.add_argument("--list-reps", type=int, default=5, help="timed full listings per size")
    p.add_argument("--scan-repeats", type=int, default=3, help="0 skips the 7B scan cost")
    p.add_argument("--dir", default=None, help="where the registries go (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--baseline-tree",
        default=None,
        help=f"folder with the baseline's agent_finetune/ (default: git archive {BASELINE_COMMIT})",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.names[0], a.ops, a.list_reps, Path(a.workdir))))
        return
    results: dict[str, Any] = {"ops": a.ops, "list_reps": a.list_reps, "sizes": {}}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp_s:
        tmp = Path(tmp_s)
        baseline = Path(a.baseline_tree) if a.baseline_tree else _baseline_tree(tmp)
        impls = {"before (42c98c6)": baseline, "after": ROOT}
        for n in a.names:
            row = results["sizes"][str(n)] = {}
            for label, path in impls.items():
                work = tmp / f"{label.split()[0]}-{n}"
                row[label] = _run_worker(path, n, a, work)
                shutil.rmtree(work)
                print(f"{n} names, {label}: done", file=sys.stderr)
        if a.scan_repeats:
            sys.path.insert(0, str(ROOT))
            results["scan_7b_r64"] = [scan_cost(tmp, d, a.scan_repeats) for d in ("F32", "F16")]
    print(f"{'names':>6}  {'op':8} {'before p50/p95 ms':>20} {'after p50/p95 ms':>20}")
    for n, row in results["sizes"].items():
        for op in ("publish", "promote", "list", "names"):
            b, f = row["before (42c98c6)"][op], row["after"][op]
            print(
                f"{n:>6}  {op:8} {b['p50_ms']:>9.1f} / {b['p95_ms']:<8.1f} "
                f"{f['p50_ms']:>9.1f} / {f['p95_ms']:<8.1f}"
            )
    for s in results.get("scan_7b_r64", []):
        c, w = s["checks_only"], s["with_scan"]
        print(
            f"validate 7B r=64 {s['dtype']} ({s['bytes'] / 1e6:.0f} MB, {s['tensors']} tensors): "
            f"checks {c['p50_ms']:.0f} ms, with NaN/Inf scan {w['p50_ms']:.0f} ms (p50)"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
