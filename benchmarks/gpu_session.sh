#!/usr/bin/env bash
# One command for a GPU session: the machine, the whole property suite on CUDA, and (optionally) the benchmarks.
#
#   OUT=/folder bash benchmarks/gpu_session.sh [--tests-limit S] [--no-tests] [--bench] [--bench-budget S] ...
#
# Run from the repository root (the device tool's `run` starts there and sets $OUT; carry [".whl"]):
#   1. machine: nvidia-smi's query, torch / triton / fla versions, the commit ($DELTACHECK_COMMIT, else git)
#      -> $OUT/machine.json
#   2. tests (unless --no-tests): python3 -m pytest properties -n 16 -p no:cacheprovider
#      --continue-on-collection-errors --junitxml=$OUT/junit.xml with DELTACHECK_PROFILE=gpu (ci's examples,
#      no shrinking) and
#      DELTACHECK_RECORD=$OUT/verification-gpu.json, TRITON_CACHE_DIR=.triton_cache (in the repo), stopped by
#      SIGINT at --tests-limit seconds (pytest then still writes junit.xml and the records; record parts of
#      workers that were cut off are merged afterwards) -> $OUT/pytest.log, junit.xml, verification-gpu.json
#   3. bench (with --bench): benchmarks.harness --point B=8,T=4096,H=16,K=128,V=128,dtype=bf16 --accuracy (every
#      op's forms beside fla and causal SDPA: fwd and fwd+bwd times, TFLOP/s, peak memory, error vs float64),
#      then the sweep + decode + accuracy sweep (--accuracy --plots) in the rest of --bench-budget, all in
#      reports/data/<gpu slug>/ (the test results copied in as verification-gpu.json / .junit.xml), packed into
#      $OUT/gpu-data.tgz (unpack at the repo root: tar xzf gpu-data.tgz) -> $OUT/bench.log, gpu-data.tgz
#   Peers' autotune results (Triton's *.autotune.json) persist across visits in <data>/autotune-cache.tgz: unpacked
#   into the Triton cache first, re-packed at the end.
#   Finally a compact summary of all of it (the last ~100 lines of output) -> $OUT/summary.txt.
#   $OUT gets at most 8 files (beside.log with --beside-*), no folders.
#
# Options:
#   --tests-limit S    pytest's time limit in seconds (default 330)
#   --no-tests         skip step 2
#   --bench            run step 3
#   --bench-budget S   seconds kept for step 3 (default 200; it gets all the time left when the tests end early);
#                      --point-share F of it (default 0.5) goes to the point (0: no point, only the sweep)
#   --profile          first, benchmarks.profile_ops at --point (per-kernel GPU time, fwd and fwd+bwd) into the
#                      data folder
#   --profile-forms LIST  --profile, of these forms only (default: profile_ops' own list)
#   --total S          end everything within S seconds of the start (default 570; a device command may run 600):
#                      the tests' limit and the bench budget shrink to fit
#   --forms LIST       harness forms, comma-separated (default: every registered form)
#   --point SPEC       default B=8,T=4096,H=16,K=128,V=128,dtype=bf16
#   --sweep-args "..." extra benchmarks.harness arguments for the sweep (e.g. "--T 1024,4096,16384 --no-decode")
#   --tests "PATHS"    what pytest runs (default properties; split on spaces, so give -k with --select)
#   --select EXPR      pytest -k EXPR (kept as one argument: --select "dplr or iplr")
#   --workers N        pytest-xdist workers (default 16; without xdist the suite runs in one process)
#   --data DIR         bench output folder (default reports/data/<gpu slug>)
#   --beside-conformance IMPLS  beside the tests (they time nothing): the conformance properties against IMPLS
#                      (e.g. fla) with --beside-workers xdist workers -> <data>/conformance-IMPLS.{json,junit.xml}
#   --beside-accuracy "ARGS"  beside the tests: benchmarks.accuracy ARGS --out <data> (error vs T)
#   --beside-workers N pytest-xdist workers of the conformance run (default 3; the tests get --workers)
#   --beside-resume JUNIT[,JUNIT]  the conformance run beside takes only the cases those runs never reported
#                      (DELTACHECK_NOT_REPORTED_IN for it alone; the tests keep their whole selection)
#   --beside-run "CMD" beside the tests: a shell command (e.g. benchmarks.diagnose_stages writing into <data>),
#                      run from the repo root with the tests' time limit; its output goes to $OUT/beside.log
#   --no-sweep-accuracy  the sweep without its accuracy part (e.g. when --beside-accuracy measured it already)
#   --dry-run          check this script on a CPU: Triton interpreter, a few test files with a 60 s limit (long
#                      enough to stop one mid-way), a tiny point and sweep, 2 workers; OUT, the data folder and
#                      the Triton cache in /tmp (nothing written to the repo)
#
# Environment passed through to the tests: DELTACHECK_IMPLS=fla (with --tests properties/test_conformance.py: the
# conformance run against fla), DELTACHECK_NOT_REPORTED_IN=JUNIT[,JUNIT] (only the tests those runs never reported,
# e.g. the cases a time-limited run cut off; join the results with `python3 -m benchmarks.gpu_summary merge-runs`).
#
# Device tool, one call of at most 600 s (both steps; or split: --tests-limit 540, then --no-tests --bench
# --bench-budget 540):
#   DELTACHECK_COMMIT=<sha> bash benchmarks/gpu_session.sh --tests-limit 300 --bench --bench-budget 220
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
START=$SECONDS

TESTS_LIMIT=330
RUN_TESTS=1
RUN_BENCH=0
BENCH_BUDGET=200
POINT_SHARE=0.5
PROFILE=0
PROFILE_ARGS=()
TOTAL=570
FORMS=""
POINT="B=8,T=4096,H=16,K=128,V=128,dtype=bf16"
SWEEP_ARGS=""
TESTS="properties"
SELECT=()
WORKERS=16
DATA=""
DRY=0
SITE=/tmp/site
BESIDE_CONF=""
BESIDE_ACC=""
BESIDE_WORKERS=3
BESIDE_RESUME=""
BESIDE_RUN=""
SWEEP_ACC=(--accuracy)

while [ $# -gt 0 ]; do
  case "$1" in
    --tests-limit) TESTS_LIMIT="$2"; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    --bench) RUN_BENCH=1; shift ;;
    --bench-budget) BENCH_BUDGET="$2"; shift 2 ;;
    --point-share) POINT_SHARE="$2"; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    --profile-forms) PROFILE=1; PROFILE_ARGS+=(--forms "$2"); shift 2 ;;
    --total) TOTAL="$2"; shift 2 ;;
    --forms) FORMS="$2"; shift 2 ;;
    --point) POINT="$2"; shift 2 ;;
    --sweep-args) SWEEP_ARGS="$2"; shift 2 ;;
    --tests) TESTS="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --beside-conformance) BESIDE_CONF="$2"; shift 2 ;;
    --beside-accuracy) BESIDE_ACC="$2"; shift 2 ;;
    --beside-workers) BESIDE_WORKERS="$2"; shift 2 ;;
    --beside-resume) BESIDE_RESUME="$2"; shift 2 ;;
    --beside-run) BESIDE_RUN="$2"; shift 2 ;;
    --select) SELECT=(-k "$2"); shift 2 ;;
    --no-sweep-accuracy) SWEEP_ACC=(); shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$DRY" = 1 ]; then
  # CPU check of the script's logic: the interpreter, tiny shapes, short limits; nothing written to the repo.
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  OUT="${OUT:-$(mktemp -d /tmp/gpu-session-dryrun.XXXXXX)}"
  SITE=/tmp/deltacheck-dryrun-site
  TESTS_LIMIT=60
  TESTS="properties/test_report_builds.py properties/test_l2norm.py properties/test_chunk_delta_rule.py"
  WORKERS=2
  RUN_BENCH=1
  BENCH_BUDGET=240
  POINT_SHARE=0.45
  POINT="B=1,T=16,H=1,K=16,V=16,dtype=fp32"
  FORMS="${FORMS:-chunk,deltaformer,fla.deltaformer,iplr.chunk,dplr.fused_recurrent,sdpa}"
  SWEEP_ARGS="--T 16 --tokens 16 --H 1 --K 16 --V 16 --dtypes fp32 --decode-batches 1 --decode-dtype fp32"
  DATA="${DATA:-$OUT-data/cpu}"
  PROFILE_ARGS=(--cpu-check --forms chunk --iters 1)
  TRITON_CACHE_DIR_OVERRIDE="$OUT-triton-cache"
fi

if [ -z "${OUT:-}" ]; then
  echo "gpu_session.sh: set OUT to the output folder (the device tool sets it)" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR_OVERRIDE:-$REPO/.triton_cache}"
mkdir -p "$TRITON_CACHE_DIR"

left() { echo $(( TOTAL - (SECONDS - START) )); }
say() { echo "[gpu_session $(( SECONDS - START ))s] $*"; }

# --- wheels for packages the GPU image lacks (fla-core)
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl >"$OUT/pip.txt" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    wheels=(.whl/*.whl)
    say "installed ${wheels[*]#.whl/} into $SITE"
  else
    say "wheel install FAILED: $(tail -n 3 "$OUT/pip.txt" | tr '\n' ' ')"
  fi
  rm -f "$OUT/pip.txt"
fi

# --- 1. machine
say "machine"
MACHINE="$(python3 -m benchmarks.gpu_summary machine --out "$OUT" 2>&1)"
echo "$MACHINE"

if [ -z "$DATA" ]; then
  SLUG="$(python3 -c 'from benchmarks.harness import device_name, slug; print(slug(device_name()))' 2>/dev/null \
          | tail -n 1)"
  DATA="$REPO/reports/data/${SLUG:-unknown-gpu}"
fi
mkdir -p "$DATA"
# Autotune results of peers (fla autotunes at every new shape; the conformance cases then run past a call's
# limit): Triton's *.autotune.json files from the last visit, kept in $DATA/autotune-cache.tgz, go back into the
# cache, and the file is re-packed with this call's at the end (it returns in gpu-data.tgz).
if [ -s "$DATA/autotune-cache.tgz" ]; then
  tar xzf "$DATA/autotune-cache.tgz" -C "$TRITON_CACHE_DIR" && \
    say "autotune cache: $(tar tzf "$DATA/autotune-cache.tgz" | grep -c 'autotune.json$') results from $DATA/autotune-cache.tgz"
fi
[ -s "$OUT/machine.json" ] && cp "$OUT/machine.json" "$DATA/machine.json"  # the report's machine record

# --- the tests' time limit (the jobs beside them get the same): what --total leaves after the bench budget
reserve=30
[ "$RUN_BENCH" = 1 ] && reserve=$(( reserve + BENCH_BUDGET ))
limit=$TESTS_LIMIT
[ $(( $(left) - reserve )) -lt "$limit" ] && limit=$(( $(left) - reserve ))
[ "$limit" -lt 30 ] && limit=30
[ "$RUN_TESTS" = 1 ] && [ "$limit" -lt "$TESTS_LIMIT" ] && say "WARNING: the tests get ${limit}s, not the ${TESTS_LIMIT}s asked:" \
  "--total ${TOTAL} keeps ${reserve}s for the rest (--bench-budget ${BENCH_BUDGET} with --bench)"

# --- beside the tests (nothing timed runs while they do): conformance against peers, the accuracy sweep
BESIDE_PIDS=()
BESIDE_DIR="$(mktemp -d)"  # their logs, joined into $OUT/beside.log at the end (one file: $OUT holds at most 8)
if [ -n "$BESIDE_CONF" ]; then
  tag="${BESIDE_CONF//,/+}"
  say "beside: conformance against $BESIDE_CONF -> $DATA/conformance-$tag.{json,junit.xml}, log $OUT/beside.log"
  DELTACHECK_IMPLS="$BESIDE_CONF" DELTACHECK_PROFILE="${DELTACHECK_PROFILE:-gpu}" \
    DELTACHECK_NOT_REPORTED_IN="${BESIDE_RESUME:-${DELTACHECK_NOT_REPORTED_IN:-}}" DELTACHECK_RECORD="$DATA/conformance-$tag.json" \
    timeout -s INT -k 30 $(( limit - 10 )) python3 -m pytest properties/test_conformance.py \
    -n "$BESIDE_WORKERS" --dist load --maxschedchunk 1 -p no:cacheprovider --junitxml="$DATA/conformance-$tag.junit.xml" \
    >"$BESIDE_DIR/conformance.log" 2>&1 &
  BESIDE_PIDS+=($!)
fi
if [ -n "$BESIDE_ACC" ]; then
  say "beside: benchmarks.accuracy $BESIDE_ACC -> $DATA, log $OUT/beside.log"
  # shellcheck disable=SC2086
  timeout -k 10 $(( limit - 10 )) python3 -m benchmarks.accuracy $BESIDE_ACC --out "$DATA" \
    >"$BESIDE_DIR/accuracy.log" 2>&1 &
  BESIDE_PIDS+=($!)
fi

if [ -n "$BESIDE_RUN" ]; then
  say "beside: $BESIDE_RUN, log $OUT/beside.log"
  timeout -k 10 $(( limit - 10 )) bash -c "$BESIDE_RUN" >"$BESIDE_DIR/run.log" 2>&1 &
  BESIDE_PIDS+=($!)
fi

# --- 2. tests
TESTS_RC=""
TIMED_OUT=""
if [ "$RUN_TESTS" = 1 ]; then
  NFLAG=()
  if python3 -c "import xdist" >/dev/null 2>&1; then
    NFLAG=(-n "$WORKERS" --dist load --maxschedchunk 1)  # one test at a time: the longest-first order holds
  else
    say "pytest-xdist missing: the suite runs in one process"
  fi
  rm -f "$OUT/verification-gpu.json" "$OUT"/verification-gpu.json.gw* "$OUT/junit.xml"
  say "tests: pytest $TESTS ${SELECT[*]} ${NFLAG[*]} (profile ${DELTACHECK_PROFILE:-gpu}, limit ${limit}s) -> $OUT/pytest.log"
  # shellcheck disable=SC2086
  DELTACHECK_PROFILE="${DELTACHECK_PROFILE:-gpu}" DELTACHECK_RECORD="$OUT/verification-gpu.json" \
    timeout -s INT -k 30 "$limit" python3 -m pytest $TESTS "${SELECT[@]}" "${NFLAG[@]}" -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/junit.xml" >"$OUT/pytest.log" 2>&1
  TESTS_RC=$?
  if [ "$TESTS_RC" = 124 ] || [ "$TESTS_RC" = 137 ]; then TIMED_OUT=$limit; fi
  say "tests done (exit code $TESTS_RC${TIMED_OUT:+, stopped at the ${TIMED_OUT}s limit}):" \
    "$(grep -E '^=+ .*(passed|failed|error|no tests ran).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1)"
fi

for pid in "${BESIDE_PIDS[@]}"; do wait "$pid"; done
for f in conformance accuracy run; do
  [ -f "$BESIDE_DIR/$f.log" ] && { echo "===== $f"; cat "$BESIDE_DIR/$f.log"; } >>"$OUT/beside.log"
done
[ ${#BESIDE_PIDS[@]} -gt 0 ] && say "beside jobs done: $(grep -hE '^=+ .*(passed|failed|error|skipped).* in ' \
  "$BESIDE_DIR/conformance.log" 2>/dev/null | tail -n 1) $(tail -n 1 "$BESIDE_DIR/accuracy.log" 2>/dev/null) $(tail -n 1 "$BESIDE_DIR/run.log" 2>/dev/null)"

# --- 3. bench
if [ "$RUN_BENCH" = 1 ]; then
  budget=$(( $(left) - 25 ))  # at least --bench-budget was kept for it; tests that end early leave it more
  if [ "$budget" -lt 40 ]; then
    say "bench skipped: only $(left) s left of --total $TOTAL"
    RUN_BENCH=0
  fi
fi
FORMS_ARG=()
[ -n "$FORMS" ] && FORMS_ARG=(--forms "$FORMS")
if [ "$RUN_BENCH" = 1 ]; then
  bench_start=$SECONDS
  : >"$OUT/bench.log"
  if [ "$PROFILE" = 1 ]; then
    say "bench: profile_ops at $POINT (fwd, fwd+bwd) -> $DATA"
    for mode in fwd fwd+bwd; do
      timeout -k 10 150 python3 -m benchmarks.profile_ops --point "$POINT" --mode "$mode" --out "$DATA" \
        "${PROFILE_ARGS[@]}" >>"$OUT/bench.log" 2>&1
    done
    say "profile done"
  fi
  if [ "$POINT_SHARE" != 0 ]; then
    avail=$(( budget - (SECONDS - bench_start) ))
    point_budget=$(python3 -c "print(max(30, int($avail * $POINT_SHARE)))")
    say "bench: point $POINT (${point_budget}s) -> $DATA, log $OUT/bench.log"
    timeout -k 10 $(( point_budget + 90 )) python3 -m benchmarks.harness --point "$POINT" --accuracy \
      --budget-s "$point_budget" --accuracy-budget-s $(( point_budget * 2 / 5 )) --out "$DATA" "${FORMS_ARG[@]}" \
      >>"$OUT/bench.log" 2>&1
    say "point done (exit code $?)"
  fi
  sweep_budget=$(( budget - (SECONDS - bench_start) ))
  [ $(( $(left) - 25 )) -lt "$sweep_budget" ] && sweep_budget=$(( $(left) - 25 ))
  if [ "$sweep_budget" -ge 30 ]; then
    acc_budget=$(( sweep_budget * 45 / 100 ))
    say "bench: sweep + decode + accuracy (${sweep_budget}s, accuracy ${acc_budget}s)"
    # shellcheck disable=SC2086
    timeout -k 10 $(( sweep_budget + 90 )) python3 -m benchmarks.harness "${SWEEP_ACC[@]}" --plots \
      --budget-s "$sweep_budget" --accuracy-budget-s "$acc_budget" --out "$DATA" "${FORMS_ARG[@]}" $SWEEP_ARGS \
      >>"$OUT/bench.log" 2>&1
    say "sweep done (exit code $?)"
  else
    say "sweep skipped: ${sweep_budget}s left"
  fi
fi

# --- results into the data folder, packed
if [ -n "$DATA" ] && [ -d "$DATA" ]; then
  if [ "$RUN_TESTS" = 1 ]; then
    python3 -m benchmarks.gpu_summary merge --out "$OUT"
    [ -s "$OUT/verification-gpu.json" ] && cp "$OUT/verification-gpu.json" "$DATA/verification-gpu.json"
    [ -s "$OUT/junit.xml" ] && cp "$OUT/junit.xml" "$DATA/verification-gpu.junit.xml"
  fi
  rm -rf "$DATA/_work"
  ( cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | sort | tar czf "$DATA/autotune-cache.tgz" -T - ) \
    2>/dev/null
  case "$DATA" in  # inside the repo: packed under its repo path (reports/data/<gpu>/...)
    "$REPO"/*) tar -czf "$OUT/gpu-data.tgz" -C "$REPO" "${DATA#"$REPO"/}" ;;
    *) tar -czf "$OUT/gpu-data.tgz" -C "$(dirname "$DATA")" "$(basename "$DATA")" ;;
  esac
fi
for f in pytest.log bench.log beside.log; do  # keep what comes back under 16 MiB a file
  if [ -f "$OUT/$f" ] && [ "$(stat -c %s "$OUT/$f")" -gt 12000000 ]; then
    tail -c 8000000 "$OUT/$f" >"$OUT/$f.tail" && mv "$OUT/$f.tail" "$OUT/$f"
  fi
done

# --- summary: everything a reply needs, at the end of the output
{
  echo "=================================== SUMMARY ==================================="
  echo "$MACHINE"
  if [ "$RUN_TESTS" = 1 ]; then
    python3 -m benchmarks.gpu_summary tests --out "$OUT" --rc "$TESTS_RC" ${TIMED_OUT:+--timed-out "$TIMED_OUT"} 2>&1
  fi
  if [ "$RUN_BENCH" = 1 ]; then
    python3 -m benchmarks.gpu_summary bench --data "$DATA" 2>&1
    grep -E "^\[(point|bench|point-accuracy|accuracy)\] .*(giving up|restarting)" "$OUT/bench.log" | tail -n 3
  fi
  echo "files in $OUT (data: $DATA):"
  ( cd "$OUT" && find . -maxdepth 1 -type f -printf '  %f %s bytes\n' | sort )
  echo "total $(( SECONDS - START )) s"
} 2>&1 | tee "$OUT/summary.txt"
