"""Training throughput of the project's `hf` backend against a plain TRL SFTTrainer script.

Both train the same locally built model (random weights) on the same rows with the same
LoRA and optimiser settings, each in its own process (peak RSS is per process), alternating
runs so machine noise hits both. Reports real (non-padding) tokens/s over the timed steps
after warm-up, peak memory, and the ratio.

    .venv/bin/python bench/train_throughput.py --repeats 3 \
        --json bench/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_finetune.registry.adapter import LINEAR_MODULES

ROOT = Path(__file__).resolve().parents[1]
MODULES = list(LINEAR_MODULES)


def make_callback(warmup: int) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        """Time and count tokens over the steps after ``warmup``."""

        def __init__(self) -> None:
            self.t0: float | None = None
            self.tokens0 = 0
            self.result: dict[str, float] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            elif self.t0 is not None and state.global_step == state.max_steps:
                dt = time.perf_counter() - self.t0
                tokens = state.num_input_tokens_seen - self.tokens0
                self.result = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}

    return StepTimer()


def run_project(model: str, data: str, out: str, a: argparse.Namespace) -> dict[str, float]:
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.train import train

    cfg = FineTuningConfig(
        model_name=model,
        output_dir=out,
        backend="hf",
        max_seq_length=a.seq_len,
        lora_r=16,
        lora_alpha=16,
        learning_rate=2e-4,
        batch_size=a.batch,
        gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
        logging_steps=1000,
        save_steps=100000,
        seed=0,
    )
    cb = make_callback(a.warmup)
    train(cfg, data, train_test_split=0.0, callbacks=[cb])
    return dict(cb.result)


def run_trl(model: str, data: str, out: str, a: argparse.Namespace) -> dict[str, float]:
    """What a user would write with TRL directly: conversational prompt/completion rows."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(Path(data).read_text(encoding="utf-8"))
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["instruction"]}],
                "completion": [{"role": "assistant", "content": r["response"]}],
            }
            for r in rows
        ]
    )
    tok = AutoTokenizer.from_pretrained(model)
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        max_steps=a.warmup + a.steps,
        max_length=a.seq_len,
        gradient_checkpointing=False,
        logging_steps=1000,
        save_steps=100000,
        seed=0,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
        bf16=False,  # TRL defaults to bf16, which needs a GPU
    )
    cb = make_callback(a.warmup)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[cb],
        peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=MODULES, task_type="CAUSAL_LM"),
    )
    trainer.train()
    return dict(cb.result)


def child(variant: str, model: str, data: str, a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as out:
        fn = run_project if variant == "project-hf" else run_trl
        result = fn(model, data, out, a)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="model width (head_dim 32)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per variant")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "MODEL", "DATA"), help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        child(*a.child, a)
        return

    from agent_finetune.training.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        src = sorted((ROOT / "examples").glob("support_*.json"))
        model = build_tiny_model(
            Path(tmp) / "model", corpus_files=src, hidden_size=a.hidden, num_layers=a.layers
        )
        rows = [r for f in src for r in json.loads(f.read_text(encoding="utf-8"))] * 20
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        results: dict[str, list[dict[str, float]]] = {"project-hf": [], "trl-sft": []}
        for i in range(a.repeats):
            for variant in results:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    str(model),
                    str(data),
                    *[
                        f"--{k.replace('_', '-')}={getattr(a, k)}"
                        for k in ("batch", "seq_len", "warmup", "steps")
                    ],
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
                results[variant].append(json.loads(line[-1][7:]))
                print(
                    f"run {i + 1}/{a.repeats} {variant}: "
                    f"{results[variant][-1]['tokens_per_s']:.0f} tok/s",
                    file=sys.stderr,
                )

    summary = {
        v: {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
            "peak_rss_gib_max": max(r["peak_rss_gib"] for r in runs),
            "tokens_per_step": runs[0]["tokens"] / a.steps,
            "runs": runs,
        }
        for v, runs in results.items()
    }
    ratio = summary["project-hf"]["tokens_per_s_median"] / summary["trl-sft"]["tokens_per_s_median"]
    print(
        f"\nmodel: hidden={a.hidden} layers={a.layers}, batch {a.batch} x <= {a.seq_len} tokens, "
        f"{a.steps} timed steps after {a.warmup}, median of {a.repeats}"
    )
    print(f"{'variant':12} {'tok/s':>10} {'peak RSS GiB':>13} {'tokens/step':>12}")
    for v, s in summary.items():
        print(
            f"{v:12} {s['tokens_per_s_median']:>10.0f} {s['peak_rss_gib_max']:>13.2f} "
            f"{s['tokens_per_step']:>12.0f}"
        )
    print(f"ratio project-hf / trl-sft tokens/s: {ratio:.3f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps({"args": vars(a), "summary": summary, "ratio": ratio}, indent=2),
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
