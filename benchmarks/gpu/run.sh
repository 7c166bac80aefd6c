#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The GPU run (issue 17, item 7): on a machine with one CUDA GPU and its own torch (no internet,
# nothing to install), from the repository root:
#
#   bash benchmarks/gpu/run.sh               # build, CUDA tests, GPU benchmarks (< 9 minutes)
#   bash benchmarks/gpu/run.sh --dry-run     # print the plan, check every entry point exists
#   bash benchmarks/gpu/run.sh --cpu-smoke   # every benchmark step on the CPU, tiny sizes
#   options: --only a,b  --skip a,b  --budget SECONDS  --list
#
# Each step runs in isolation under its own `timeout` (clipped to what is left of the budget);
# a failing step is recorded and the run goes on. Everything lands in $OUT (./gpu-out when
# unset), in three files so that a runner returning few files gets all of it:
#   run.log          every step's output, prefixed with the step's name
#   summary.json     per step: status, exit code, seconds, the step's JSON results, test counts
#                    and failures, the log tail of a failed step; the goals with their verdicts
#   details.tar.gz   the per-step logs, JSON and junit files
# The three are rewritten after every step, so a run killed from outside still leaves them.
# Exit status: 0 when every step passed (or was skipped), 1 otherwise. docs/benchmarks.md,
# "GPU run", says what each step measures.

set -u -o pipefail

SELF="${BASH_SOURCE[0]}"
ROOT="$(cd "$(dirname "$SELF")/../.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

# --- internal steps (the script runs itself under `timeout` for multi-command steps) ---------

internal_build() {
  echo "CUDA_HOME=${CUDA_HOME:-<unset>} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}" \
       "MAX_JOBS=${MAX_JOBS:-<unset>}"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' || return 1
  if ! "$PY" setup.py build_ext --inplace; then
    echo "build_ext FAILED; the compiler's error lines:" >&2
    grep -n -E "error|Error" "$WORK/build.log" 2>/dev/null | grep -v "^.*-Werror" | head -40 >&2
    return 1
  fi
  check_extension cuda
}

# Prints where the extension came from and its kernels; fails unless it loaded (with CUDA
# kernels when $1 is cuda).
check_extension() {
  "$PY" - "$1" <<'EOF'
import sys
from peftreg import ops
print("extension:", ops.extension_origin(), "| error:", ops.extension_error(),
      "| built with CUDA:", ops.built_with_cuda())
for op, device, available in ops.kernel_report():
    print(f"  {op:32} {device:5} {'yes' if available else 'NO'}")
ok = ops.has_extension() and (sys.argv[1] != "cuda" or ops.built_with_cuda())
sys.exit(0 if ok else 1)
EOF
}

internal_install() {
  # Registers peftreg, peftreg_plugins and the entry points only: PEFTREG_BUILD_EXT=0 keeps
  # setup.py from compiling again; the in-place library from the build step is what loads.
  if PEFTREG_BUILD_EXT=0 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
       --disable-pip-version-check -e .; then
    echo "pip editable install: ok"
  else
    echo "pip editable install failed; falling back to a PYTHONPATH shim" >&2
    "$PY" benchmarks/gpu/gpurun.py shim "$WORK/shim" || return 1
    echo "$ROOT:$WORK/shim${PYTHONPATH:+:$PYTHONPATH}" > "$WORK/pythonpath"
    export PYTHONPATH="$(cat "$WORK/pythonpath")"
  fi
  "$PY" -c 'import peftreg, peftreg_plugins.qlora; print("peftreg", peftreg.__version__, "imports")'
}

internal_fail() {
  echo "injected failure (GPU_RUN_FAIL_STEP)" >&2
  return 3
}

if [[ "${1:-}" == "--internal" ]]; then
  "internal_$2"
  exit $?
fi

# --- options ---------------------------------------------------------------------------------

MODE=gpu ONLY="" SKIP="" BUDGET="${GPU_RUN_BUDGET:-530}" LIST=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --cpu-smoke) MODE=smoke ;;
    --only) ONLY=",$2,"; shift ;;
    --skip) SKIP=",$2,"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --list) LIST=1 ;;
    -h|--help) sed -n '3,23p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/peftreg-gpu-run.XXXXXX")" || exit 2
export WORK PY ROOT
LOG="$OUT/run.log"
: > "$LOG"
: > "$WORK/steps.tsv"

log() { echo "$*" | tee -a "$LOG"; }

finish_files() {
  # The summary must survive anything a step did, python included.
  "$PY" benchmarks/gpu/gpurun.py summary --work "$WORK" --out "$OUT/summary.json" \
      >>"$WORK/summary-errors.log" 2>&1 ||
    echo "{\"error\": \"gpurun.py summary failed; see details.tar.gz\"}" > "$OUT/summary.json"
  tar -czf "$OUT/details.tar.gz.tmp" -C "$WORK" . 2>/dev/null &&
    mv -f "$OUT/details.tar.gz.tmp" "$OUT/details.tar.gz"
}

selected() {
  [[ -n "$ONLY" && "$ONLY" != *",$1,"* ]] && return 1
  [[ "$SKIP" == *",$1,"* ]] && return 1
  return 0
}

record() {  # name status rc seconds limit command
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/steps.tsv"
}

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND under timeout, log it, record its status.
step() {
  local name="$1" limit="$2"; shift 2
  local command="$*"
  if [[ $LIST == 1 ]]; then echo "$name"; return 0; fi
  if ! selected "$name"; then
    record "$name" skipped 0 0 0 "not selected (--only/--skip)"; return 0
  fi
  if [[ "${GPU_RUN_FAIL_STEP:-}" == "$name" ]]; then
    set -- bash "$SELF" --internal fail
  fi
  if [[ $MODE == dry ]]; then
    local arg missing=""
    for arg in "$@"; do
      if [[ "$arg" == *.py || "$arg" == *.sh ]] && [[ "$arg" != -* && ! -f "$arg" ]]; then
        missing="$missing $arg"
      elif [[ "$arg" == *.py ]]; then
        "$PY" -m py_compile "$arg" 2>>"$WORK/$name.log" || missing="$missing $arg(syntax)"
      fi
    done
    if [[ -n "$missing" ]]; then
      log "[dry-run] $name: MISSING$missing"
      record "$name" failed 1 0 "$limit" "missing:$missing"
    else
      log "[dry-run] $name (<= ${limit}s): $command"
      record "$name" planned 0 0 "$limit" "$command"
    fi
    return 0
  fi
  local left=$(( BUDGET - SECONDS - 10 ))
  if (( left < 20 )); then
    log "=== $name: skipped, out of time (${SECONDS}s of ${BUDGET}s used)"
    record "$name" skipped 0 0 0 "out of time: $command"; finish_files; return 0
  fi
  (( limit > left )) && limit=$left
  log "=== $name (timeout ${limit}s, at ${SECONDS}s): $command"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" < /dev/null 2>&1 | tee "$WORK/$name.log" |
    sed -u "s/^/[$name] /" >> "$LOG"
  rc=${PIPESTATUS[0]}
  local status=ok
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
  log "=== $name: $status (exit $rc, $(( SECONDS - start ))s)"
  record "$name" "$status" "$rc" "$(( SECONDS - start ))" "$limit" "$command"
  if [[ -f "$WORK/pythonpath" ]]; then export PYTHONPATH="$(cat "$WORK/pythonpath")"; fi
  finish_files
}

# skip_step NAME REASON: recorded as skipped (steps that only make sense in another mode).
skip_step() {
  if [[ $LIST == 1 ]]; then echo "$1"; return 0; fi
  if selected "$1"; then record "$1" skipped 0 0 0 "$2"
  else record "$1" skipped 0 0 0 "not selected (--only/--skip)"; fi
}

# --- the plan, in priority order (what matters most runs first) ------------------------------

DEV=cuda
[[ $MODE == smoke ]] && DEV=cpu
if [[ $MODE == gpu ]]; then
  export CUDA_HOME="${CUDA_HOME:-}"
  if [[ $LIST == 0 ]]; then
    found="$(timeout 60 "$PY" benchmarks/gpu/gpurun.py cuda-home 2>/dev/null)" && CUDA_HOME="$found"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(timeout 60 "$PY" benchmarks/gpu/gpurun.py arch-list 2>/dev/null || echo 9.0)}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
  fi
fi
TIMEOUT_OPT=()
if [[ $MODE == gpu && $LIST == 0 ]] && "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TIMEOUT_OPT=(--timeout=120)
fi
PYTEST=("$PY" -m pytest -rfE -p no:cacheprovider --continue-on-collection-errors)
B=benchmarks

[[ $LIST == 0 ]] && log "peftreg GPU run: mode=$MODE budget=${BUDGET}s out=$OUT work=$WORK $(date -u +%FT%TZ)"

step env 45 "$PY" $B/gpu/gpurun.py env --out "$WORK/env.json"

if [[ $MODE == smoke ]]; then
  skip_step build "--cpu-smoke uses the extension already built here"
  skip_step install "--cpu-smoke uses the installed peftreg"
  # The CUDA selections must collect (wiring), without running anything on a device.
  TEST_RUN=(--collect-only)
else
  step build 300 bash "$SELF" --internal build
  step install 90 bash "$SELF" --internal install
  # -v names each test as it starts, so a hung kernel's test is the log's last line.
  TEST_RUN=(-v --durations=10 "${TIMEOUT_OPT[@]}")
fi
# One process per op family: a CUDA error that poisons the context (an illegal address, say)
# fails that family's remaining tests, not every later test.
for group in lora nf4 adapters ops optim; do
  case $group in
    ops) paths=(tests/ops --ignore=tests/ops/lora --ignore=tests/ops/nf4
                --ignore=tests/ops/adapters) ;;
    optim) paths=(tests/optim) ;;
    *) paths=("tests/ops/$group") ;;
  esac
  step "cuda-tests-$group" 90 env PEFTREG_TEST_DEVICE=cuda "${PYTEST[@]}" "${TEST_RUN[@]}" \
      "${paths[@]}" -k cuda --junitxml="$WORK/cuda-tests-$group.xml"
done

if [[ $MODE == smoke ]]; then
  NF4_BW=(--shapes 64x128); NF4_ALL=(--shapes 64x128 --tasks "fwd b=1 eval" "fwd+bwd b=256")
  TINY=(--shapes 4x64x64x4 --dtypes fp32 --min-run-time 0.01)
  QLORA=("${TINY[@]}"); LORA=("${TINY[@]}"); PAGED=(--smoke); ADAPTERS=(--quick --only ia3)
else
  # Weights far past the 50-60 MB L2, so both the dequantize and the copy stream from HBM.
  NF4_BW=(--shapes 8192x8192 16384x16384); NF4_ALL=()
  QLORA=(--dtypes bf16); LORA=(--dtypes fp32 bf16); PAGED=(); ADAPTERS=(--dtypes bf16)
fi

step nf4-bandwidth 90 "$PY" $B/bench_nf4.py --device $DEV --quick "${NF4_BW[@]}" \
    --tasks dequantize --out "$WORK/nf4-bandwidth.json"
step qlora 120 "$PY" $B/bench_fused_lora.py --device $DEV --base nf4 --quick "${QLORA[@]}" \
    --out "$WORK/qlora.json"
step lora 120 "$PY" $B/bench_fused_lora.py --device $DEV --quick "${LORA[@]}" \
    --out "$WORK/lora.json"
step nf4 90 "$PY" $B/bench_nf4.py --device $DEV --quick "${NF4_ALL[@]}" --out "$WORK/nf4.json"
step paged 120 "$PY" $B/bench_paged_adamw.py --device $DEV --quick "${PAGED[@]}" \
    --out "$WORK/paged.json"
step adapters 90 "$PY" $B/bench_adapters.py --device $DEV "${ADAPTERS[@]}" \
    --out "$WORK/adapters.json"

if [[ $MODE == smoke ]]; then
  skip_step cpu-tests "the CPU tests run in the ordinary suite"
else
  # Last, with whatever time is left: the CPU tests against the CUDA build of the extension.
  step cpu-tests 240 env PEFTREG_TEST_DEVICE=cpu "${PYTEST[@]}" -q "${TIMEOUT_OPT[@]}" \
      tests/ops tests/optim -k "not cuda" --junitxml="$WORK/cpu-tests.xml"
fi

[[ $LIST == 1 ]] && exit 0

finish_files
"$PY" benchmarks/gpu/gpurun.py summary --work "$WORK" --out "$OUT/summary.json" --print \
    2>>"$WORK/summary-errors.log" | tee -a "$LOG" || {
  log "summary table unavailable (python failed); the steps were:"
  sed 's/\t/  /g' "$WORK/steps.tsv" | cut -c1-160 | tee -a "$LOG"
}
tar -czf "$OUT/details.tar.gz" -C "$WORK" . 2>/dev/null
log "wrote $OUT/run.log, $OUT/summary.json, $OUT/details.tar.gz ($(( SECONDS ))s)"
if awk -F'\t' '$2 != "ok" && $2 != "skipped" && $2 != "planned" { bad = 1 } END { exit bad }' \
     "$WORK/steps.tsv"; then
  rm -rf "$WORK"
  exit 0
fi
rm -rf "$WORK"
exit 1
