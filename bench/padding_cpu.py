"""Padding per batch vs padding to max_seq_length: training tokens/s of SmolLM2-135M on a CPU.

The shipped `configs/smollm2-135m-cpu.yaml` on `facts_v1.json` (replay guard on, answers
from the cache), ``--steps`` optimizer steps, in this process: ``dynamic`` is what `train`
does (TRL's collator pads each batch to its longest row); ``max`` pads every batch to
max_seq_length (the collator's ``pad_to_multiple_of``), as a trainer that pads to a fixed
length does. tok/s counts real (non-pad) tokens.

    AGENT_FINETUNE_MODELS=/tmp/models python bench/padding_cpu.py --mode dynamic --steps 12
    AGENT_FINETUNE_MODELS=/tmp/models python bench/padding_cpu.py --mode max --steps 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["dynamic", "max"], required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--workdir", default="/tmp/af_padding")
    args = p.parse_args()
    import trl

    from agent_finetune.training import train as train_module
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.models import prepare_model

    if args.mode == "max":
        real = trl.SFTConfig

        def padded(*a: Any, **kw: Any) -> Any:
            return real(*a, **{**kw, "pad_to_multiple_of": args.max_len})

        trl.SFTConfig = padded  # type: ignore[misc]  # _make_trainer imports it from trl
    cfg = FineTuningConfig.from_yaml(
        ROOT / "configs" / "smollm2-135m-cpu.yaml",
        model_name=str(prepare_model("smollm2-135m-instruct").path),
        output_dir=str(Path(args.workdir) / args.mode),
        max_steps=args.steps,
        max_seq_length=args.max_len,
    )
    result = train_module.train(
        cfg, ROOT / "agent_finetune" / "assets" / "facts_v1.json", train_test_split=0.0
    )
    m = result.metrics
    keep = ("train_seconds", "tokens_seen", "train_tokens_per_second", "global_steps")
    print(json.dumps({"mode": args.mode, **{k: m[k] for k in keep}}))


if __name__ == "__main__":
    main()
