#!/usr/bin/env bash
# One call on a GPU machine: build, CUDA tests, compute-sanitizer, benchmarks.
#   make gpu-report OUT=dir      (or: bash tools/gpu_report.sh dir)
# Leaves few files (the device tool returns at most 8): summary.txt, one log
# per stage, and results.tgz with every benchmark table (CSV/Markdown/PNG).
set -uo pipefail
OUT="${1:?usage: tools/gpu_report.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
summary="$OUT/summary.txt"
: > "$summary"
failed=0

stage() {  # stage NAME COMMAND...: runs, logs to OUT/NAME.log, records rc
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$summary"
  tail -n 4 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=1
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; \
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -1; } >> "$summary" 2>&1

stage build python -m pip install --no-build-isolation --no-deps -e .
stage info python -m alexnet_ext.info
stage tests python -m pytest -q -rs
sanitize() {
  for tool in memcheck racecheck; do
    for case in $(python tests/sanitizer_cases.py --list); do
      echo "--- $tool $case"
      compute-sanitizer --tool "$tool" --error-exitcode 3 python tests/sanitizer_cases.py "$case" || return 1
    done
  done
}
stage sanitizer sanitize
bench() {
  mkdir -p "$OUT/results"
  for b in benchmarks/bench_*.py; do
    echo "--- $b"
    python "$b" --out "$OUT/results" || return 1
  done
  cp "$OUT"/results/*.{csv,md,png} benchmarks/results/ 2>/dev/null
  tar -C "$OUT" -czf "$OUT/results.tgz" results && rm -rf "$OUT/results"
}
stage bench bench
echo "gpu-report: $( [ $failed -eq 0 ] && echo all stages passed || echo SOME STAGES FAILED )" | tee -a "$summary"
exit $failed
