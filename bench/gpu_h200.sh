#!/usr/bin/env bash
# The H200 steps behind BENCHMARKS.md "GPU serving (H200)": GPU vLLM 0.26.0 installed from
# carried wheels (../shared/tools/gpu-vllm-wheels.sh split it into .vllm0..5 + .vllmdeps,
# one call each: `mkdir -p /tmp/vw && cp .vllmN/part.N /tmp/vw/`), then the plugin's live
# tests and bench/gpu_serving.py. Run from a copy of this tree that sits in the project's
# root on the GPU host (the .vllm* folders are its siblings), output under $OUT.
#
#   bash bench/gpu_h200.sh model     # while the parts travel: the Qwen2.5-0.5B-shaped test model
#   bash bench/gpu_h200.sh install   # join + check + install vllm and its wheels to /tmp/vsite
#   bash bench/gpu_h200.sh tests     # live server tests on GPU vLLM -> $OUT/pytest_gpu.txt
#   bash bench/gpu_h200.sh bench     # bench/gpu_serving.py -> $OUT/gpu_serving.json
set -euo pipefail
here=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=$here:/tmp/vsite PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# FlashInfer's sampler JIT-compiles at engine start (about 90 s on a fresh host, nothing
# can be fetched there); greedy requests never use it.
export VLLM_USE_FLASHINFER_SAMPLER=0
case "$1" in
model)
  python3 -c "from agent_finetune.training.tiny_model import build_shaped_model as b
b('/tmp/af/qwen05', 'qwen2.5-0.5b')"
  ls -la /tmp/af/qwen05
  ;;
install)
  whl=/tmp/vw/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
  cat /tmp/vw/part.? >"$whl"
  sha256sum -c ../.vllmdeps/vllm.sha256
  # our package from its wheel (for the vllm.endpoint_plugins entry point); the tree
  # itself comes first on PYTHONPATH
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite \
    "$whl" ../.vllmdeps/*.whl .whl/*.whl
  python3 -c "import vllm, server_plugin.compat as c; print('vllm', vllm.__version__)"
  ;;
tests)
  export AGENT_FINETUNE_TEST_MODEL=/tmp/af/qwen05
  export AGENT_FINETUNE_TEST_VLLM_ARGS="--gpu-memory-utilization 0.4 --enforce-eager"
  set +e
  timeout "${TESTS_TIMEOUT:-520}" python3 -m pytest tests/server/test_server.py \
    tests/server/test_compat.py -v -rA -p no:cacheprovider --basetemp /tmp/pt \
    2>&1 | tee "$out/pytest_gpu.txt"
  code=${PIPESTATUS[0]}
  for f in /tmp/pt/hotswap0/vllm-*.log; do tail -c 400000 "$f" >"$out/$(basename "$f")"; done
  exit "$code"
  ;;
bench)
  shift
  python3 bench/gpu_serving.py --workdir /tmp/gs --json "$out/gpu_serving.json" "$@" \
    2>&1 | tee "$out/gpu_serving.txt"
  tail -c 400000 /tmp/gs/serve.log >"$out/serve.log" || true
  ;;
*)
  echo "usage: $0 model|install|tests|bench" >&2
  exit 2
  ;;
esac
