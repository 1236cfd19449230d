"""Does SmolLM2-135M-Instruct learn the facts, answer paraphrases, and keep its skills?

Trains ``configs/smollm2-135m-cpu.yaml`` on a facts file (or scores the untrained base with
``--base``), then scores offline greedy answers (transformers + PEFT, fp32) on the held-out
paraphrases, the general probes and the training questions (``agent_finetune.training.recall``:
an answer counts when it contains the row's key). One JSON per run (``--out``).

    python bench/real_model_quality.py --base --out base.json
    python bench/real_model_quality.py --replay-ratio 1.0 --out guard.json
    python bench/real_model_quality.py --replay-ratio 0 --out no_guard.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from agent_finetune.training import recall
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.models import prepare_model
from agent_finetune.training.train import train

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "agent_finetune" / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ASSETS / "facts_v1.json"))
    p.add_argument("--replay-ratio", type=float, default=None, help="default: the config's")
    p.add_argument("--base", action="store_true", help="score the untrained base model")
    p.add_argument("--workdir", default="/tmp/af_quality")
    p.add_argument("--out", default="quality.json")
    args = p.parse_args()
    base = str(prepare_model("smollm2-135m-instruct").path)
    out: dict[str, object] = {"args": vars(args)}
    if args.base:
        ask = recall.offline_asker(base)
    else:
        over: dict[str, object] = {}
        if args.replay_ratio is not None:
            over["replay"] = {"ratio": args.replay_ratio, "max_new_tokens": 64}
        cfg = FineTuningConfig.from_yaml(
            ROOT / "configs" / "smollm2-135m-cpu.yaml",
            model_name=base,
            output_dir=str(Path(args.workdir) / "run"),
            **over,
        )
        started = time.perf_counter()
        result = train(cfg, args.data, train_test_split=0.0)
        out["wall_s"] = round(time.perf_counter() - started, 1)
        keep = ("train_seconds", "train_tokens_per_second", "tokens_seen", "global_steps")
        out["metrics"] = {k: result.metrics[k] for k in (*keep, "replay_rows", "train_loss")}
        ask = recall.offline_asker(result.adapter_dir)
    for name, path in (
        ("paraphrases", ASSETS / "facts_paraphrases.json"),
        ("probes", ASSETS / "general_probes.json"),
        ("training_questions", ASSETS / "facts_v1.json"),
    ):
        results = recall.score(recall.load_keyed(path), ask)
        out[name] = {
            "right": recall.hits(results),
            "of": len(results),
            "rows": [[r.question, r.answer, r.hit] for r in results],
        }
        print(f"{name}: {recall.hits(results)}/{len(results)}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
