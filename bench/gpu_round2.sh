#!/usr/bin/env bash
# Round 2 of the H200 training measurements (issue 13), one device call per phase:
#   bash bench/gpu_round2.sh tests7b   # GPU correctness tests + the 7B shape + logits check
#   bash bench/gpu_round2.sh small     # the 1.5B shape
# Expects the wheels of shared/tools/device-wheels.sh (plus liger-kernel, trl 1.14.2) in $WHL
# (default .whl) and writes at most 8 files to $OUT (the device tool's limit).
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-.whl}
OUT=${OUT:-/tmp/gpu_round2}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
  && cp -r "$WHL"/site/* /tmp/site/ || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|trl|liger|unsloth|cut)" | tr -s ' '
case "${1:-}" in
  tests7b)
    AF_GPU_RESULTS=/tmp/gpu_tests timeout 200 python3 -m pytest tests/training/test_gpu_varlen.py \
      -q -p no:cacheprovider -x 2>&1 | tail -15
    python3 - <<'PY' > "$OUT/gpu_tests.json"
import json, pathlib
print(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path("/tmp/gpu_tests").glob("*.json"))}, indent=1))
PY
    python3 bench/gpu_train.py --shape qwen2.5-7b --batch 2 --seq-len 4096 --steps 8 --warmup 3 \
      --variants project_unsloth,project_hf,project_hf_noliger --profile --logits-check \
      --budget-s 330 --worker-timeout-s 180 --quiet --out "$OUT/7b_round2.json"
    ;;
  small)
    python3 bench/gpu_train.py --shape qwen2.5-1.5b --batch 2 --seq-len 4096 --steps 8 --warmup 3 \
      --variants project_unsloth,project_hf --profile --budget-s 200 --worker-timeout-s 150 \
      --quiet --out "$OUT/1.5b_round2.json"
    ;;
  expandable)
    # the 7B Unsloth padded run again with expandable segments (a 2 s step in tests7b), its
    # logits check with the fp32 noise floor, then the 1.5B shape, all in one call
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    python3 bench/gpu_train.py --shape qwen2.5-7b --batch 2 --seq-len 4096 --steps 8 --warmup 3 \
      --variants project_unsloth:pad --logits-check --budget-s 300 --worker-timeout-s 150 \
      --quiet --out "$OUT/7b_unsloth_expandable.json"
    python3 bench/gpu_train.py --shape qwen2.5-1.5b --batch 2 --seq-len 4096 --steps 8 --warmup 3 \
      --variants project_unsloth,project_hf --budget-s 100 --worker-timeout-s 100 \
      --quiet --out "$OUT/1.5b_round2.json"
    ;;
  *) echo "usage: $0 tests7b|small|expandable" >&2; exit 2 ;;
esac
cat /tmp/agent_bench/results/*/profiles/*/profile.txt > "$OUT/profiles.txt" 2>/dev/null
tail -n 60 /tmp/agent_bench/results/*/*.log > "$OUT/worker_logs.txt" 2>/dev/null
