"""GPU training throughput: the project's unsloth and hf backends against a raw Unsloth loop.

One call per model shape. Every variant trains LoRA r=16 on all 7 linear layers, bf16, with
the project's gradient checkpointing policy (``--grad-ckpt``, default auto), the same batch
size and sequence length, for ``--warmup`` untimed and ``--steps`` timed optimizer steps
(gradient accumulation 1):

- ``project_unsloth``: ``agent_finetune.training.train.train`` with ``backend: unsloth``
- ``project_hf``: ``agent_finetune.training.train.train`` with ``backend: hf``
  (transformers+PEFT+TRL; varlen attention, Liger kernels when installed)
- ``project_hf_noliger``: the same without Liger's kernels (the A/B behind choosing them)
- ``project_hf_fp8``: ``backend: hf`` with ``precision: fp8`` (frozen base weights in FP8,
  row-scaled); ``project_hf_fp8tensor``: the same with per-tensor scales (the A/B behind the
  default)
- ``raw_unsloth``: ``FastLanguageModel`` + ``get_peft_model`` and a hand-written AdamW loop,
  the reference ceiling
- ``raw_peft``: the same hand-written loop on plain transformers+PEFT (CPU smoke test only)

Modes: ``pad`` (every row is exactly ``--seq-len`` tokens, so no padding at all) and ``pack``
(rows of varied lengths packed padding-free into ``--batch`` bins of ``--seq-len`` tokens).
Only real (non-pad) tokens count.

Each variant runs in its own process (``--processes per-family``: one process for the Unsloth
variants, one for the rest, saving Unsloth's ~35 s import per variant): Unsloth patches
transformers globally, so the hf backend must run where Unsloth was never imported. The base
model has random weights (throughput and memory do not depend on weight values) and a locally
trained tokenizer; it is built once under ``--workdir`` and reused.

MFU = (4 N tokens + attention) / time / 989 TFLOP/s, where N counts the weights of every linear
layer a token passes through (attention and MLP projections, lm_head; not the embedding), 4N is
forward plus the backward input gradients of frozen weights (LoRA's own FLOPs, under 1%, and
the checkpointing recompute are not counted), and attention adds 12 * layers * n_heads *
head_dim FLOPs per causal (query, key) pair within a document (QK^T and AV, forward + backward).
FP8 runs count the same model FLOPs against the same bf16 peak (as NVIDIA's NeMo figures do), so
their MFU is directly comparable.

``--trace`` records, for every step, Python garbage-collection pauses, torch.compile activity
(dynamo/inductor counters, recompiles in the worker log via ``TORCH_LOGS=recompiles``), the
caching allocator's cudaMalloc/cudaFree counts, and samples the main thread's Python stack
every 50 ms: a slow step (over 1.5x the median) comes out with what it was doing.
``--fp8-probe`` times the shape's seven projections alone (forward + input gradient, bf16
against FP8 with both scalings) and their error against fp32.

    python bench/gpu_train.py --shape qwen2.5-7b --batch 2 --seq-len 4096 --steps 10 \
        --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet
VARIANTS = (
    "project_unsloth",
    "project_hf",
    "project_hf_noliger",
    "project_hf_fp8",
    "project_hf_fp8tensor",
    "raw_unsloth",
    "raw_peft",
)
UNSLOTH_VARIANTS = ("project_unsloth", "raw_unsloth")
MODES = ("pad", "pack")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16
LR = 2e-4
SEED = 42

# A shape small enough for a CPU smoke test of every code path except Unsloth.
TINY_SHAPE: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def log(msg: str) -> None:
    print(f"[gpu_train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shape_config(shape: str) -> dict[str, Any]:
    from agent_finetune.training.tiny_model import KNOWN_SHAPES

    if shape == "tiny":
        return dict(TINY_SHAPE)
    return dict(KNOWN_SHAPES[shape])


# -- FLOPs --------------------------------------------------------------------------------------
def linear_params(cfg: dict[str, Any]) -> int:
    """Weights of every linear layer one token passes through (incl. lm_head, not embedding)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * head_dim
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    return layers * per_layer + h * cfg["vocab_size"]


def attention_flops_per_pair(cfg: dict[str, Any]) -> int:
    """Forward + backward FLOPs of one causal (query, key) pair, summed over layers."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 12 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * head_dim


def causal_pairs(lengths: list[int]) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


# -- data ---------------------------------------------------------------------------------------
def _words(n: int, rng: random.Random) -> list[str]:
    syll = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def _text(vocab: list[str], n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n_words))


def write_datasets(root: Path, tokenizer: Any, seq_len: int, rows_needed: int) -> dict[str, Any]:
    """pad.jsonl: rows longer than seq_len (truncated to exactly seq_len in training).
    pack.jsonl: log-normal lengths (median seq_len/8, clipped to [32, seq_len]), enough tokens
    for rows_needed full bins."""
    rng = random.Random(SEED)
    vocab = _words(3000, random.Random(1))
    sample = _text(vocab, 2000, rng)
    tok_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000

    def row(n_tokens: int) -> dict[str, str]:
        n_words = max(4, int(n_tokens / tok_per_word))
        n_prompt = max(2, n_words // 8)
        return {
            "instruction": _text(vocab, n_prompt, rng),
            "response": _text(vocab, n_words - n_prompt, rng),
        }

    pad = [row(seq_len + 64) for _ in range(rows_needed)]
    pack: list[dict[str, str]] = []
    budget = int(rows_needed * seq_len * 1.3)
    total = 0
    while total < budget:
        n = int(min(seq_len - 16, max(32, rng.lognormvariate(math.log(seq_len / 8), 0.9))))
        pack.append(row(n))
        total += n
    for name, rows in (("pad", pad), ("pack", pack)):
        with (root / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return {"tokens_per_word": tok_per_word, "pad_rows": len(pad), "pack_rows": len(pack)}


def prepare(args: argparse.Namespace) -> Path:
    """Build (once) the random-weight model, tokenizer and datasets under workdir/shape."""
    import torch

    from agent_finetune.training.tiny_model import build_model_from_config, train_tokenizer

    root = Path(args.workdir) / f"{args.shape}-s{args.seq_len}"
    model_dir = root / "model"
    if (root / "READY").is_file():
        log(f"reusing {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vocab = _words(3000, random.Random(1))
    rng = random.Random(0)
    corpus = [_text(vocab, 40, rng) for _ in range(3000)]
    tokenizer = train_tokenizer(corpus, vocab_size=8192)
    cfg = shape_config(args.shape)
    cfg["eos_token_id"] = tokenizer.eos_token_id
    cfg["bos_token_id"] = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    model = build_model_from_config(cfg, dtype=torch.bfloat16, device=device)
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(model_dir)
    del model
    rows_needed = args.batch * (args.warmup + args.steps) + 8
    info = write_datasets(root, tokenizer, args.seq_len, rows_needed)
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    (root / "prepare.json").write_text(json.dumps(info, indent=2))
    (root / "READY").write_text("ok")
    log(f"prepared {root} in {info['build_seconds']} s: {info}")
    return root


# -- measuring ----------------------------------------------------------------------------------
def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> dict[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    stats = torch.cuda.memory_stats()
    return {
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        # cudaMalloc failures that made the caching allocator free everything and retry
        "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }


class StepTrace:
    """Cheap evidence of what a slow step did, without a profiler in the timed steps.

    GC pauses come from ``gc.callbacks``; torch.compile activity from dynamo's counters; the
    caching allocator's device allocations from ``torch.cuda.memory_stats``; and a daemon
    thread samples the main thread's Python stack every ``interval`` seconds. ``mark()`` at the
    end of each step snapshots the counters; ``report()`` returns the intervals between step
    ends that took over ``slow`` times the median, each with its evidence.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.gc_pauses: list[tuple[float, int, float, int]] = []  # (end time, gen, s, collected)
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.marks: list[tuple[float, dict[str, float]]] = []
        self._gc_start = 0.0
        self._main = threading.get_ident()
        self._stop = threading.Event()
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._gc_start = now
        else:
            self.gc_pauses.append(
                (
                    now,
                    int(info.get("generation", -1)),
                    now - self._gc_start,
                    info.get("collected", 0),
                )
            )

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            stack: list[str] = []
            while frame is not None and len(stack) < 14:
                code = frame.f_code
                stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno}:{code.co_name}")
                frame = frame.f_back
            self.samples.append((time.perf_counter(), tuple(stack)))

    @staticmethod
    def _counters() -> dict[str, float]:
        out: dict[str, float] = {}
        with contextlib.suppress(Exception):
            from torch._dynamo.utils import counters

            for group, counter in counters.items():
                out[f"dynamo.{group}"] = float(sum(counter.values()))
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                stats = torch.cuda.memory_stats()
                for key in ("num_device_alloc", "num_device_free", "num_alloc_retries"):
                    out[f"cuda.{key}"] = float(stats.get(key, 0))
                out["cuda.reserved_gib"] = stats.get("reserved_bytes.all.current", 0) / 2**30
        return out

    def mark(self, when: float) -> None:
        self.marks.append((when, self._counters()))

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def report(self, slow: float = 1.5) -> dict[str, Any]:
        from collections import Counter

        self.close()
        durations = [b[0] - a[0] for a, b in itertools.pairwise(self.marks)]
        if not durations:
            return {}
        median = statistics.median(durations)
        gc_total = sum(p[2] for p in self.gc_pauses)
        out: dict[str, Any] = {
            "sample_interval_s": self.interval,
            "gc_pauses": len(self.gc_pauses),
            "gc_seconds_total": round(gc_total, 3),
            "gc_longest": sorted(
                ({"gen": g, "s": round(d, 3), "collected": c} for _, g, d, c in self.gc_pauses),
                key=lambda x: -x["s"],
            )[:5],
            "slow_intervals": [],
        }
        for i, d in enumerate(durations):
            (t0, c0), (t1, c1) = self.marks[i], self.marks[i + 1]
            if d <= slow * median:
                continue
            stacks = Counter(st[:8] for t, st in self.samples if t0 < t <= t1)
            out["slow_intervals"].append(
                {
                    # the interval ending at step (i + 2), counting steps from 1
                    "step": i + 2,
                    "seconds": round(d, 3),
                    "median_seconds": round(median, 3),
                    "gc": [
                        {"gen": g, "s": round(dd, 3)}
                        for t, g, dd, _ in self.gc_pauses
                        if t0 < t <= t1
                    ],
                    "counters_delta": {
                        k: round(c1[k] - c0.get(k, 0.0), 3)
                        for k in c1
                        if abs(c1[k] - c0.get(k, 0.0)) > 1e-9
                    },
                    "stacks": [
                        {"samples": n, "stack": list(st)} for st, n in stacks.most_common(4)
                    ],
                }
            )
        return out


class Timing:
    """Wall time and real tokens of the ``steps`` steps after warm-up (each step synchronized).

    ``step_begin``/``step_end`` split each step into time inside the step (forward, backward,
    optimizer) and time between steps (data loading, logging, callbacks). With ``profile_dir``
    one extra step after the timed ones runs under torch.profiler.
    """

    def __init__(
        self, warmup: int, steps: int, profile_dir: Path | None = None, trace: bool = False
    ) -> None:
        self.warmup = warmup
        self.steps = steps
        self.profile_dir = profile_dir
        self.trace = StepTrace() if trace else None
        self.step_begins: list[float] = []
        self.step_ends: list[float] = []
        self.tokens_at_end: list[int] = []
        self.losses: list[float] = []
        self.profile: dict[str, Any] = {}
        self._prof: Any = None

    def step_begin(self) -> None:
        _sync()
        self.step_begins.append(time.perf_counter())
        if self.profile_dir is not None and len(self.step_ends) == self.warmup + self.steps:
            import torch

            self._prof = torch.profiler.profile(
                activities=[
                    torch.profiler.ProfilerActivity.CPU,
                    torch.profiler.ProfilerActivity.CUDA,
                ]
            )
            self._prof.__enter__()
            self._prof_t0 = time.perf_counter()

    def step_end(self, tokens_seen: int) -> None:
        _sync()
        self.step_ends.append(time.perf_counter())
        self.tokens_at_end.append(int(tokens_seen))
        if self.trace is not None:
            self.trace.mark(self.step_ends[-1])
        if self._prof is not None:
            self._finish_profile()

    def _finish_profile(self) -> None:
        prof, self._prof = self._prof, None
        wall = time.perf_counter() - self._prof_t0
        prof.__exit__(None, None, None)
        avg = prof.key_averages()

        def dev(e: Any) -> float:
            return float(getattr(e, "self_device_time_total", 0) or 0)

        # GPU-side events only (kernels, memcpy, memset): an aten op's self device time is the
        # same kernels again.
        gpu_events = [e for e in avg if str(getattr(e, "device_type", "")).endswith("CUDA")]
        kernels_us = sum(dev(e) for e in gpu_events)
        self.profile = {
            "profiled_step_wall_s": round(wall, 4),
            "gpu_kernel_s": round(kernels_us / 1e6, 4),
            "gpu_busy_fraction": round(kernels_us / 1e6 / wall, 3) if wall else None,
            "cuda_launches": int(
                sum(
                    e.count
                    for e in avg
                    if e.key
                    in (
                        "cudaLaunchKernel",
                        "cuLaunchKernel",
                        "cudaLaunchKernelExC",
                        "cuLaunchKernelEx",
                    )
                )
            ),
            "top_gpu": [
                (e.key[:70], round(dev(e) / 1e3, 2), e.count)
                for e in sorted(gpu_events, key=dev, reverse=True)[:15]
            ],
        }
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        with (self.profile_dir / "profile.txt").open("a") as f:
            f.write(f"== {self.profile_dir.name}\n{json.dumps(self.profile, indent=1)}\n")
            f.write(avg.table(sort_by="self_cpu_time_total", row_limit=20))
            f.write("\n")

    def result(self) -> dict[str, Any]:
        w, n = self.warmup, self.warmup + self.steps
        if w < 1:
            raise RuntimeError("--warmup must be >= 1")
        if len(self.step_ends) < n:
            raise RuntimeError(f"only {len(self.step_ends)} steps ran; need {n}")
        ends, begins = self.step_ends[:n], self.step_begins[:n]
        secs = ends[-1] - ends[w - 1]
        tokens = self.tokens_at_end[n - 1] - self.tokens_at_end[w - 1]
        all_durs = [b - a for a, b in itertools.pairwise(ends)]
        durations = all_durs[w - 1 :]
        inside = [e - b for b, e in zip(begins[w:], ends[w:], strict=True)]
        return {
            "timed_steps": n - w,
            "timed_seconds": round(secs, 4),
            "timed_tokens": tokens,
            "tokens_per_second": round(tokens / secs, 1),
            "step_seconds_median": round(statistics.median(durations), 4),
            "step_seconds_min": round(min(durations), 4),
            "step_seconds_max": round(max(durations), 4),
            # share of the timed wall time spent outside forward/backward/optimizer
            "between_steps_fraction": round(1 - sum(inside) / secs, 4),
            "all_step_seconds": [round(d, 4) for d in all_durs],
            **({"profile": self.profile} if self.profile else {}),
            **({"trace": self.trace.report()} if self.trace is not None else {}),
        }


def make_callback(timing: Timing) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _reset_peak()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            timing.step_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            timing.step_end(state.num_input_tokens_seen)
            if len(timing.step_ends) == timing.warmup + timing.steps:
                timing.peak = _peak()  # type: ignore[attr-defined]

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                timing.losses.append(float(logs["loss"]))

    return StepTimer()


# -- variants -----------------------------------------------------------------------------------
def run_project(variant: str, mode: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the project's own entry point, train(), timed by a TrainerCallback."""
    from agent_finetune.registry import Registry
    from agent_finetune.registry.adapter import load_base_config
    from agent_finetune.training import fp8
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    backend = "unsloth" if variant == "project_unsloth" else "hf"
    precision = "fp8" if variant.startswith("project_hf_fp8") else "default"
    if variant == "project_hf_fp8tensor":
        fp8.DEFAULT_SCALING = "tensor"  # the A/B only
    if precision == "fp8" and not _cuda():
        fp8.unsupported_reason = lambda: None  # CPU smoke test: torch's CPU _scaled_mm
    run_dir = root / "runs" / f"{variant}-{mode}-gc{args.grad_ckpt}"
    registry = root / "registry"
    config = FineTuningConfig(
        model_name=str(root / "model"),
        backend=backend,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        max_seq_length=args.seq_len,
        lora_r=LORA_R,
        lora_alpha=LORA_R,
        target_modules=list(TARGET_MODULES),
        learning_rate=LR,
        batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps + (1 if args.profile else 0),
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        bf16=_cuda() or args.bf16_cpu,
        gradient_checkpointing=args.grad_ckpt,
        packing=mode == "pack",
        output_dir=str(run_dir),
        save_steps=100_000,
        seed=SEED,
        adapter_name=f"bench-{variant.replace('_', '-')}-{mode}",
        registry_dir=str(registry),
    )
    timing = Timing(
        args.warmup, args.steps, _profile_dir(args, f"{variant}-{mode}"), trace=args.trace
    )
    started = time.perf_counter()
    result = train(
        config, root / f"{mode}.jsonl", train_test_split=0.0, callbacks=[make_callback(timing)]
    )
    out = {**timing.result(), **getattr(timing, "peak", _peak())}
    out["train_call_seconds"] = round(time.perf_counter() - started, 1)
    out["losses"] = [round(x, 4) for x in timing.losses]
    out["backend_used"] = result.backend
    out["project_metrics"] = {
        k: result.metrics.get(k)
        for k in (
            "train_rows",
            "truncated_rows",
            "tokens_seen",
            "train_seconds",
            "peak_memory_gib",
            "train_loss",
            "gradient_checkpointing",
            "attention",
            "liger_kernel",
            "precision",
        )
    }
    if result.published is not None:
        report = Registry(registry).verify(
            result.published.name,
            result.published.version,
            base_config=load_base_config(root / "model"),
            max_rank=LORA_R,
        )
        out["published"] = f"{result.published.name}@{result.published.version}"
        out["registry_verify_ok"] = report.ok
        out["registry_verify_problems"] = report.problems
        out["adapter_dir"] = str(result.published.path)
    return out


def _rows(root: Path, mode: str, tokenizer: Any, seq_len: int) -> list[dict[str, list[int]]]:
    """The same tokenized rows the project path trains on."""
    from agent_finetune.training.data import load_dataset_file
    from agent_finetune.training.prompts import tokenize_examples

    ds = load_dataset_file(root / f"{mode}.jsonl")
    train_rows, _ = ds.split(0.0, SEED)
    return tokenize_examples(tokenizer, train_rows, max_seq_length=seq_len).rows


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: row indices per bin, each bin at most ``capacity`` tokens."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        best = min(
            (j for j in range(len(bins)) if free[j] >= n), key=lambda j: free[j], default=None
        )
        if best is None:
            bins.append([i])
            free.append(capacity - n)
        else:
            bins[best].append(i)
            free[best] -= n
    return bins


def make_batches(
    rows: list[dict[str, list[int]]],
    mode: str,
    batch: int,
    seq_len: int,
    steps: int,
    packed_lengths_kwarg: bool,
) -> list[dict[str, Any]]:
    """CPU tensors for ``steps`` optimizer steps, cycling over the rows."""
    import torch

    rng = random.Random(SEED)
    out: list[dict[str, Any]] = []
    if mode == "pad":
        order = list(range(len(rows)))
        rng.shuffle(order)
        k = 0
        for _ in range(steps):
            picked = [rows[order[(k + j) % len(order)]] for j in range(batch)]
            k += batch
            assert all(len(r["input_ids"]) == seq_len for r in picked), "pad rows must be full"
            ids = torch.tensor([r["input_ids"] for r in picked])
            labels = torch.tensor([r["labels"] for r in picked])
            out.append({"input_ids": ids, "labels": labels, "_lengths": [seq_len] * batch})
        return out
    bins = pack_bins([len(r["input_ids"]) for r in rows], seq_len)
    rng.shuffle(bins)
    k = 0
    for _ in range(steps):
        docs = [i for j in range(batch) for i in bins[(k + j) % len(bins)]]
        k += batch
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lengths: list[int] = []
        for i in docs:
            r = rows[i]
            n = len(r["input_ids"])
            ids += r["input_ids"]
            # the first token of a document is never a target of the previous one
            labels += [-100, *r["labels"][1:]]
            pos += list(range(n))
            lengths.append(n)
        b: dict[str, Any] = {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
            "_lengths": lengths,
        }
        if packed_lengths_kwarg:
            b["packed_seq_lengths"] = torch.tensor(lengths, dtype=torch.int32)
        out.append(b)
    return out


def run_raw(impl: str, mode: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A hand-written loop: forward with labels, backward, fused AdamW step. No Trainer."""
    import torch

    from agent_finetune.training import checkpointing

    t0 = time.perf_counter()
    model_dir = str(root / "model")
    # the project's checkpointing policy for this shape, so both loops recompute alike
    plan = checkpointing.decide(
        args.grad_ckpt,
        checkpointing.ModelShape.from_config(shape_config(args.shape)),
        tokens=args.batch * args.seq_len,
        backend="unsloth" if impl == "unsloth" else "hf",
        free_bytes=checkpointing.free_memory_bytes(),
    )
    if impl == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_dir,
            max_seq_length=args.seq_len,
            dtype=torch.bfloat16,
            load_in_4bit=False,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=LORA_R,
            target_modules=list(TARGET_MODULES),
            lora_alpha=LORA_R,
            lora_dropout=0.0,
            bias="none",
            use_gradient_checkpointing=plan.unsloth_mode,
            random_state=SEED,
        )
        FastLanguageModel.for_training(model)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if (_cuda() or args.bf16_cpu) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if _cuda():
            model = model.cuda()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if plan.recompute:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA_R,
                lora_alpha=LORA_R,
                lora_dropout=0.0,
                target_modules=list(TARGET_MODULES),
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
        model.train()
    load_s = time.perf_counter() - t0
    device = next(model.parameters()).device
    rows = _rows(root, mode, tokenizer, args.seq_len)
    total_steps = args.warmup + args.steps + (1 if args.profile else 0)
    batches = make_batches(
        rows, mode, args.batch, args.seq_len, total_steps, packed_lengths_kwarg=impl == "unsloth"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    timing = Timing(
        args.warmup, args.steps, _profile_dir(args, f"raw_{impl}-{mode}"), trace=args.trace
    )
    _reset_peak()
    tokens = 0
    pairs_timed = 0
    for step, b in enumerate(batches):
        if step == args.warmup + args.steps:
            peak = _peak()
        timing.step_begin()
        lengths = b["_lengths"]
        inputs = {
            k: v if k == "packed_seq_lengths" else v.to(device, non_blocking=True)
            for k, v in b.items()
            if k != "_lengths"
        }
        out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(lengths)
        if args.warmup <= step < args.warmup + args.steps:
            pairs_timed += causal_pairs(lengths)
        timing.step_end(tokens)
        if step >= total_steps - 3:
            timing.losses.append(float(out.loss.detach()))
    if len(batches) == args.warmup + args.steps:
        peak = _peak()
    res = {**timing.result(), **peak, "load_seconds": round(load_s, 1)}
    res["project_metrics"] = {"gradient_checkpointing": plan.as_metrics()}
    res["losses"] = [round(x, 4) for x in timing.losses]
    res["causal_pairs_timed"] = pairs_timed
    return res


def dataset_pairs_per_token(root: Path, mode: str, seq_len: int) -> float:
    """Average causal pairs per token over the tokenized training rows (for MFU estimates)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "model"))
    lengths = [len(r["input_ids"]) for r in _rows(root, mode, tok, seq_len)]
    return causal_pairs(lengths) / sum(lengths)


def _allocated_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.memory_allocated() / 2**30, 3)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def _profile_dir(args: argparse.Namespace, name: str) -> Path | None:
    return Path(args.result_dir, "profiles", name) if args.profile else None


def parse_runs(spec: str) -> list[tuple[str, str]]:
    """``variant:mode,variant:mode`` -> [(variant, mode), ...]."""
    runs = []
    for item in spec.split(","):
        variant, _, mode = item.partition(":")
        runs.append((variant, mode))
    return runs


def worker(args: argparse.Namespace) -> None:
    """Run each (variant, mode) of ``--runs`` in this process; write one JSON per run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(args.root)
    runs = parse_runs(args.runs)
    t0 = time.perf_counter()
    if any(v in UNSLOTH_VARIANTS for v, _ in runs):
        import unsloth  # noqa: F401  # before transformers, as the project's backend does
    import_s = time.perf_counter() - t0
    for variant, mode in runs:
        res: dict[str, Any] = {
            "variant": variant,
            "mode": mode,
            "import_seconds": round(import_s, 1),
            "versions": _versions(),
            # left over from an earlier run in this process; peaks include it
            "mem_before_gib": _allocated_gib(),
            "batch": args.batch,
        }
        started = time.perf_counter()
        try:
            if variant == "project_hf_noliger":
                from agent_finetune.training import train as train_module

                train_module.liger_usable = lambda: False  # the A/B baseline only
                res.update(run_project("project_hf", mode, root, args))
                train_module.liger_usable = _liger_usable
            elif variant.startswith("project_"):
                res.update(run_project(variant, mode, root, args))
            else:
                res.update(run_raw(variant.removeprefix("raw_"), mode, root, args))
        except Exception as e:  # recorded; the driver carries on with the other variants
            import traceback

            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["wall_seconds"] = round(time.perf_counter() - started, 1)
        if args.grad_ckpt != "auto":
            res["variant"] += f"+gc{args.grad_ckpt}"
        res["unsloth_imported"] = "unsloth" in sys.modules
        Path(args.result_dir, f"{res['variant']}-{mode}.json").write_text(json.dumps(res, indent=2))
        log(
            f"{variant}/{mode}: "
            + json.dumps({k: res.get(k) for k in ("tokens_per_second", "peak_alloc_gib", "error")})
        )
        gc.collect()
        if _cuda():
            import torch

            torch.cuda.empty_cache()


def _liger_usable() -> bool:
    from agent_finetune.training.backend import liger_usable

    return liger_usable()


# -- FP8 probe -------------------------------------------------------------------------------
def _projections(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of one decoder layer's seven projections."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, inter),
        ("up_proj", h, inter),
        ("down_proj", inter, h),
    ]


def fp8_probe(args: argparse.Namespace) -> None:
    """The shape's seven projections alone, forward + input gradient of ``batch x seq_len``
    tokens: a frozen bf16 nn.Linear against FP8Linear (row and tensor scaling). Times are the
    median of 5 repeats after 3 (CUDA events); errors are relative norms against fp32."""
    import torch

    from agent_finetune.training import fp8

    cfg = shape_config(args.shape)
    device = "cuda" if _cuda() else "cpu"
    tokens = args.batch * args.seq_len
    gen = torch.Generator(device=device).manual_seed(SEED)
    out: dict[str, Any] = {"tokens": tokens, "device": device, "projections": {}}
    totals: dict[str, float] = {}

    def timed(fn: Any) -> float:
        times = []
        for i in range(8):
            if device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t) * 1e3
            if i >= 3:
                times.append(ms)
        return statistics.median(times)

    for name, fan_in, fan_out in _projections(cfg):
        w = torch.randn(fan_out, fan_in, device=device, generator=gen, dtype=torch.float32) * 0.02
        x = torch.randn(tokens, fan_in, device=device, generator=gen, dtype=torch.float32)
        g = torch.randn(tokens, fan_out, device=device, generator=gen, dtype=torch.float32)
        ref_out, ref_grad = x @ w.t(), g @ w
        lin = torch.nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        lin.requires_grad_(False)
        layers: dict[str, Any] = {"bf16": lin}
        for scaling in fp8.SCALINGS:
            layers[f"fp8_{scaling}"] = fp8.FP8Linear.from_linear(lin, scaling)  # type: ignore[arg-type]
        row: dict[str, Any] = {"in": fan_in, "out": fan_out}
        for key, layer in layers.items():
            xb = x.to(torch.bfloat16).requires_grad_()
            gb = g.to(torch.bfloat16)

            def step(layer: Any = layer, xb: Any = xb, gb: Any = gb) -> None:
                layer(xb).backward(gb)
                xb.grad = None

            y = layer(xb)
            y.backward(gb)
            assert xb.grad is not None
            out_err = float((y.detach().float() - ref_out).norm() / ref_out.norm())
            grad_err = float((xb.grad.float() - ref_grad).norm() / ref_grad.norm())
            row[key] = {
                "ms": round(timed(step), 4),
                "out_rel_err": round(out_err, 5),
                "grad_rel_err": round(grad_err, 5),
            }
            totals[key] = totals.get(key, 0.0) + row[key]["ms"]
        out["projections"][name] = row
        del w, x, g, ref_out, ref_grad, layers, lin
    flops = 4 * tokens * sum(i * o for _, i, o in _projections(cfg))
    out["layer_ms"] = {k: round(v, 3) for k, v in totals.items()}
    out["layer_tflops"] = {k: round(flops / (v / 1e3) / 1e12, 1) for k, v in totals.items()}
    out["speedup_vs_bf16"] = {k: round(totals["bf16"] / v, 3) for k, v in totals.items()}
    Path(args.result_dir, "fp8_probe.json").write_text(json.dumps(out, indent=2))
    log("fp8 probe: " + json.dumps({k: out[k] for k in ("layer_ms", "speedup_vs_bf16")}))


# -- logits check ---------------------------------------------------------------------------------
def logits_check(args: argparse.Namespace) -> None:
    """Unsloth (base + published adapter) vs plain PEFT logits, each in its own process."""
    import torch

    root = Path(args.root)
    adapter = Path(args.adapter)
    ids_path = Path(args.result_dir) / "logits_ids.pt"
    if args.worker == "logits_unsloth":
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(adapter),
            max_seq_length=args.seq_len,
            dtype=torch.bfloat16,
            load_in_4bit=False,
        )
        model.eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 8000, (1, args.logits_len), generator=g)
        torch.save(ids, ids_path)
        with torch.no_grad():
            logits = model(input_ids=ids.cuda()).logits
        torch.save(logits.float().cpu(), Path(args.result_dir) / "logits_unsloth.pt")
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.load(ids_path).cuda()
    base = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=torch.bfloat16).cuda()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits.float().cpu()
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.float().cpu()
        # the bf16 noise floor: the same PEFT model in fp32
        model = model.float()
        peft32 = model(input_ids=ids).logits.float().cpu()
    uns = torch.load(Path(args.result_dir) / "logits_unsloth.pt")

    def rel(a: Any, b: Any) -> float:
        return float((a - b).norm() / b.norm())

    res = {
        "variant": "logits_check",
        "adapter": str(adapter),
        "tokens": args.logits_len,
        "unsloth_vs_peft_max_abs": float((uns - peft_logits).abs().max()),
        "unsloth_vs_peft_rel_norm": rel(uns, peft_logits),
        "peft_logit_abs_max": float(peft_logits.abs().max()),
        "adapter_effect_rel_norm": rel(peft_logits, base_logits),
        "argmax_agreement": float((uns.argmax(-1) == peft_logits.argmax(-1)).float().mean()),
        "unsloth_bf16_vs_peft_fp32_rel_norm": rel(uns, peft32),
        "peft_bf16_vs_peft_fp32_rel_norm": rel(peft_logits, peft32),
        "unsloth_imported": "unsloth" in sys.modules,
    }
    Path(args.result_dir, "logits_check.json").write_text(json.dumps(res, indent=2))
    log("logits check: " + json.dumps(res))


# -- driver ---------------------------------------------------------------------------------------
def flops_for(res: dict[str, Any], cfg: dict[str, Any], pairs_per_token: float) -> float:
    tokens = res["timed_tokens"]
    pairs = res.get("causal_pairs_timed") or pairs_per_token * tokens
    return 4 * linear_params(cfg) * tokens + attention_flops_per_pair(cfg) * pairs


def _spawn(
    argv: list[str], log_path: Path, timeout: float, env: dict[str, str] | None = None
) -> int:
    """Run a worker, echo and save its output, kill it after ``timeout`` seconds."""
    import threading

    log(f"$ {' '.join(argv)}")
    with log_path.open("w") as logf:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if ECHO:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            log(f"killed after {timeout:.0f} s")
        reader.join(timeout=10)
    return rc


ECHO = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-7b", help="qwen2.5-1.5b, qwen2.5-7b or tiny")
    p.add_argument("--batch", type=int, default=2, help="rows (pad) or packed bins per step")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per row / per packed bin")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed optimizer steps first")
    p.add_argument(
        "--variants",
        default="raw_unsloth,project_unsloth,project_hf",
        help=f"comma list of {', '.join(VARIANTS)}; VARIANT:pad runs that variant in pad mode only",
    )
    p.add_argument("--modes", default="pad,pack", help="comma list of pad, pack")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="one process per (variant, mode) instead of one per variant",
    )
    p.add_argument(
        "--processes",
        default="per-variant",
        choices=["per-variant", "per-family"],
        help="per-family: the Unsloth variants share one process, the others another",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="record GC pauses, compile activity, cudaMallocs and stack samples of slow steps",
    )
    p.add_argument(
        "--fp8-probe",
        action="store_true",
        help="time the shape's projections alone, bf16 vs FP8 (forward + input gradient)",
    )
    p.add_argument(
        "--logits-check",
        action="store_true",
        help="compare Unsloth and plain-PEFT logits of the project_unsloth adapter",
    )
    p.add_argument("--logits-len", type=int, default=256)
    p.add_argument("--workdir", default="/tmp/agent_bench", help="model, data and runs")
    p.add_argument("--out", default="gpu_train.json", help="JSON results file")
    p.add_argument(
        "--budget-s",
        type=float,
        default=560.0,
        help="skip variants that would start after this many seconds",
    )
    p.add_argument("--worker-timeout-s", type=float, default=300.0)
    p.add_argument(
        "--deadline-s",
        type=float,
        default=float("inf"),
        help="stop the running worker this many seconds after the start, then report",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run one extra step after the timed ones under torch.profiler",
    )
    p.add_argument(
        "--grad-ckpt",
        default="auto",
        choices=["auto", "on", "off", "offload"],
        help="gradient_checkpointing for every variant (the raw loops follow the same policy)",
    )
    p.add_argument(
        "--no-grad-ckpt",
        dest="grad_ckpt",
        action="store_const",
        const="off",
        help="round 1's spelling of --grad-ckpt off (round 1 itself ran --grad-ckpt offload)",
    )
    p.add_argument("--bf16-cpu", action="store_true", help="bf16 on CPU too (smoke tests)")
    p.add_argument("--quiet", action="store_true", help="do not echo worker output")
    # internal
    p.add_argument(
        "--worker", choices=["runs", "prepare", "fp8_probe", "logits_unsloth", "logits_peft"]
    )
    p.add_argument("--runs", help="variant:mode,... for --worker runs")
    p.add_argument("--root")
    p.add_argument("--result-dir")
    p.add_argument("--adapter")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="print one table (with ratios) from several result files of one shape",
    )
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        name, _, only = v.partition(":")
        if name not in VARIANTS:
            p.error(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        if only and only not in MODES:
            p.error(f"--variants: {v!r}: mode must be pad or pack")
    for m in args.modes.split(","):
        if m not in MODES:
            p.error(f"--modes: unknown {m!r}; choose from pad, pack")
    return args


def main(argv: list[str] | None = None) -> int:
    global ECHO
    args = parse_args(argv)
    if args.combine:
        print_table(combine([json.loads(Path(f).read_text()) for f in args.combine]))
        return 0
    ECHO = not args.quiet
    if args.worker == "prepare":
        prepare(args)
        return 0
    if args.worker in ("logits_unsloth", "logits_peft"):
        logits_check(args)
        return 0
    if args.worker == "fp8_probe":
        fp8_probe(args)
        return 0
    if args.worker == "runs":
        worker(args)
        return 0
    return drive(args, argv)


def _worker_argv(args: argparse.Namespace, result_dir: Path) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--shape",
        args.shape,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--workdir",
        args.workdir,
        "--result-dir",
        str(result_dir),
        "--grad-ckpt",
        args.grad_ckpt,
        *(["--bf16-cpu"] if args.bf16_cpu else []),
        *(["--profile"] if args.profile else []),
        *(["--trace"] if args.trace else []),
    ]


def _jobs(args: argparse.Namespace) -> list[list[tuple[str, str]]]:
    """The (variant, mode) runs of each worker process, in order."""
    modes = args.modes.split(",")
    per_variant: list[list[tuple[str, str]]] = []
    for spec in args.variants.split(","):
        name, _, only = spec.partition(":")
        wanted = [only] if only else modes
        runs = [(name, m) for m in wanted]
        per_variant += [[r] for r in runs] if args.isolate else [runs]
    if args.processes == "per-variant":
        return per_variant
    flat = [r for job in per_variant for r in job]
    families = [
        [r for r in flat if r[0] in UNSLOTH_VARIANTS],
        [r for r in flat if r[0] not in UNSLOTH_VARIANTS],
    ]
    if flat and flat[0][0] not in UNSLOTH_VARIANTS:
        families.reverse()  # in the order of --variants
    return [f for f in families if f]


def run_workers(args: argparse.Namespace, common: list[str], root: Path, started: float) -> None:
    env = {**os.environ, **({"TORCH_LOGS": "recompiles"} if args.trace else {})}
    for runs in _jobs(args):
        elapsed = time.monotonic() - started
        if elapsed > args.budget_s:
            log(f"skipping {runs}: past --budget-s {args.budget_s}")
            continue
        spec = ",".join(f"{v}:{m}" for v, m in runs)
        name = "-".join(f"{v}-{m}" for v, m in runs)[:120]
        _spawn(
            [*common, "--root", str(root), "--worker", "runs", "--runs", spec],
            Path(common[common.index("--result-dir") + 1]) / f"{name}.log",
            # a worker still running at --deadline-s is stopped; its finished runs are kept
            max(1.0, min(args.worker_timeout_s, args.deadline_s - elapsed)),
            env=env,
        )


def run_logits_check(
    args: argparse.Namespace, common: list[str], root: Path, results: list[dict[str, Any]]
) -> dict[str, Any] | None:
    adapter = next(
        (
            r.get("adapter_dir")
            for r in results
            if r["variant"].startswith("project_unsloth") and r.get("adapter_dir")
        ),
        None,
    )
    if not adapter:
        return None
    result_dir = Path(common[common.index("--result-dir") + 1])
    for w in ("logits_unsloth", "logits_peft"):
        _spawn(
            [*common, "--root", str(root), "--worker", w, "--adapter", adapter],
            result_dir / f"{w}.log",
            300,
        )
    f = result_dir / "logits_check.json"
    return json.loads(f.read_text()) if f.is_file() else {"error": "no result"}


def add_mfu(
    args: argparse.Namespace, root: Path, results: list[dict[str, Any]]
) -> dict[str, float]:
    cfg = shape_config(args.shape)
    modes = {r["mode"] for r in results} or set(args.modes.split(","))
    pairs = {
        m: (args.seq_len + 1) / 2 if m == "pad" else dataset_pairs_per_token(root, m, args.seq_len)
        for m in modes
    }
    for r in results:
        if r.get("peak_alloc_gib") is not None and r.get("mem_before_gib") is not None:
            r["peak_net_gib"] = round(r["peak_alloc_gib"] - r["mem_before_gib"], 3)
        if "timed_tokens" in r:
            fl = flops_for(r, cfg, pairs[r["mode"]])
            r["model_tflops"] = round(fl / r["timed_seconds"] / 1e12, 1)
            r["mfu"] = round(fl / r["timed_seconds"] / (PEAK_TFLOPS * 1e12), 4)
    add_ratios(results)
    return pairs


def drive(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Prepare once, run every variant in its own process, add MFU, write JSON, print."""
    started = time.monotonic()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result_dir = Path(args.workdir) / "results" / f"{args.shape}-{int(time.time())}"
    result_dir.mkdir(parents=True, exist_ok=True)
    common = _worker_argv(args, result_dir)
    probe = None
    if args.fp8_probe:
        _spawn([*common, "--worker", "fp8_probe"], result_dir / "fp8_probe.log", 300)
        f = result_dir / "fp8_probe.json"
        probe = json.loads(f.read_text()) if f.is_file() else {"error": "no result"}
    rc = _spawn([*common, "--worker", "prepare"], result_dir / "prepare.log", 900)
    if rc != 0:
        log(f"prepare failed (rc={rc}); see {result_dir / 'prepare.log'}")
        return 1
    root = Path(args.workdir) / f"{args.shape}-s{args.seq_len}"
    run_workers(args, common, root, started)
    results = [
        json.loads(f.read_text())
        for f in sorted(result_dir.glob("*.json"))
        if f.name.startswith(("project_", "raw_"))
    ]
    logits = None
    if args.logits_check and time.monotonic() - started < args.budget_s:
        logits = run_logits_check(args, common, root, results)
    pairs = add_mfu(args, root, results)
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    prep = root / "prepare.json"
    summary = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(
            [os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]
        ),
        "shape": args.shape,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "gpu": gpu,
        "linear_params": linear_params(shape_config(args.shape)),
        "peak_tflops": PEAK_TFLOPS,
        "attention_pairs_per_token": pairs,
        "prepare": json.loads(prep.read_text()) if prep.is_file() else None,
        "results": results,
        "logits_check": logits,
        "fp8_probe": probe,
        "driver_seconds": round(time.monotonic() - started, 1),
        "logs": str(result_dir),
    }
    out_path.write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return 0


def add_ratios(results: list[dict[str, Any]]) -> None:
    by = {(r["variant"], r["mode"]): r for r in results}
    for r in results:
        tps = r.get("tokens_per_second")
        for ref in ("raw_unsloth", "project_hf", "project_unsloth"):
            other = by.get((ref, r["mode"]), {}).get("tokens_per_second")
            if tps and other and ref != r["variant"]:
                r[f"vs_{ref}"] = round(tps / other, 3)


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from several runs of the same shape (later files win per variant/mode)."""
    merged = {**summaries[0], "results": []}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for s in summaries:
        for r in s["results"]:
            seen[(r["variant"], r["mode"])] = r
    merged["results"] = list(seen.values())
    merged["commands"] = [s["command"] for s in summaries]
    add_ratios(merged["results"])
    return merged


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"\n{summary['shape']}  batch {summary['batch']} x {summary['seq_len']}  "
        f"{summary['steps']} timed steps after {summary['warmup']}  ({summary['gpu']})"
    )
    head = (
        f"{'mode':5} {'variant':19} {'tok/s':>9} {'peak GiB':>9} {'MFU':>6} "
        f"{'vs raw':>7} {'vs hf':>6} {'vs uns':>6} {'step s':>7} {'ckpt':>4} {'est GiB':>7}  note"
    )
    print(head)
    print("-" * len(head))
    for r in sorted(summary["results"], key=lambda r: (r["mode"], r["variant"])):

        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            v = r.get(key)
            width = int(fmt.split(".")[0]) if fmt[0].isdigit() else 1
            return format(v, fmt) if isinstance(v, int | float) else "-".rjust(width)

        note = r.get("error", "")[:60] if r.get("error") else ""
        plan = (r.get("project_metrics") or {}).get("gradient_checkpointing") or {}
        ckpt = "-" if not plan else ("on" if plan.get("recompute") else "off")
        est = plan.get("estimate_off_gib")
        est_s = f"{est:7.1f}" if isinstance(est, int | float) else f"{'-':>7}"
        print(
            f"{r['mode']:5} {r['variant']:19} {f('tokens_per_second', '9.0f')} "
            f"{f('peak_alloc_gib', '9.2f')} {f('mfu', '6.1%')} {f('vs_raw_unsloth', '7.2f')} "
            f"{f('vs_project_hf', '6.2f')} {f('vs_project_unsloth', '6.2f')} "
            f"{f('step_seconds_median', '7.3f')} {ckpt:>4} {est_s}  "
            f"{note}"
        )
    if summary.get("logits_check"):
        print("logits check:", json.dumps(summary["logits_check"]))
    probe = summary.get("fp8_probe") or {}
    if probe.get("layer_ms"):
        print(
            f"fp8 probe, one layer's 7 projections, {probe['tokens']} tokens, forward + input "
            "gradient: "
            + ", ".join(
                f"{k} {v:.2f} ms ({probe['speedup_vs_bf16'][k]:.2f}x)"
                for k, v in probe["layer_ms"].items()
            )
        )
    for r in summary["results"]:
        for slow in (r.get("trace") or {}).get("slow_intervals", []):
            top = slow["stacks"][0]["stack"][:3] if slow["stacks"] else []
            print(
                f"slow step {r['variant']}/{r['mode']} #{slow['step']}: {slow['seconds']} s "
                f"(median {slow['median_seconds']}); gc {slow['gc']}; "
                f"counters {slow['counters_delta']}; top stack {top}"
            )


if __name__ == "__main__":
    sys.exit(main())
