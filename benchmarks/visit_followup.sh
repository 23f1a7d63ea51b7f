#!/usr/bin/env bash
# What GPU visit 17 left, in one device call under the current defaults: the DPLR launch tune on the square chunk_h
# and chunk_A, the first call at a new shape (fresh process, empty Triton cache: the goal's own measure) for the
# delta and DPLR chunk forms, the long-T delta point beside fla, then the DPLR / IPLR conformance and
# generalized-form cases in the time left.
#
#   OUT=/folder DELTACHECK_COMMIT=<sha> bash benchmarks/visit_followup.sh [TOTAL_S]     (carry .whl for fla)
#
# Everything lands in $OUT/d.tgz: tune-*.json, first-call-*.json, point-*.json (under d/<name>/), the tests' junit
# and records (merge them into verification-gpu.* with benchmarks.gpu_summary merge-runs). TOTAL_S (default 560)
# bounds the whole call; each step has its own limit and the tests get what the steps leave.
set -uo pipefail
TOTAL=${1:-560}
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p "$TRITON_CACHE_DIR"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
D=$OUT/d; mkdir -p "$D"; T0=$SECONDS; at() { echo "[$((SECONDS - T0)) s] $*"; }
P=B=8,T=4096,H=16,K=128,V=128,dtype=bf16
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version \
    --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${DELTACHECK_COMMIT:-?}"; } > "$D/machine.txt"; cat "$D/machine.txt"
# first calls before anything fills a cache (first_call.py gives each measurement its own empty one)
timeout 150 python3 -m benchmarks.first_call --forms chunk,dplr.chunk --point $P --ahead 1 --timeout-s 60 \
  --out "$D/first" > "$D/first.log" 2>&1; at "first calls (rc $?)"
DATA=reports/data/$(python3 -c 'from benchmarks.harness import device_name, slug; print(slug(device_name()))' \
  2>/dev/null | tail -n 1)
[ -s "$DATA/autotune-cache.tgz" ] && tar xzf "$DATA/autotune-cache.tgz" -C "$TRITON_CACHE_DIR"
timeout 170 python3 -m benchmarks.tune_launch --forms dplr.chunk --point $P --warps 2,4,8 --stages 1,2,3 \
  --budget-s 150 --out "$D/tune" > "$D/tune.log" 2>&1; at "tune (rc $?)"
timeout 100 python3 -m benchmarks.harness --point B=2,T=16384,H=16,K=128,V=128,dtype=bf16 --forms chunk,fla.chunk \
  --budget-s 40 --task-limit-s 45 --out "$D/longT" > "$D/longT.log" 2>&1; at "long T (rc $?)"
R=$((TOTAL - SECONDS + T0))
DELTACHECK_PROFILE=gpu DELTACHECK_RECORD=$D/verification-conformance.json timeout -s INT -k 15 $R \
  python3 -m pytest -p no:cacheprovider -n 16 -q properties/test_conformance.py \
  properties/test_generalized_forms_agree.py -k "dplr or iplr or generalized" \
  --junitxml=$D/tests.junit.xml > "$D/tests.log" 2>&1; at "tests (rc $?)"
grep -E "first|ahead|dplr|chunk" "$D/first.log" | tail -8; grep -A6 "^form " "$D/longT.log"
tail -30 "$D/tune.log"; grep -E "passed|failed|FAILED" "$D/tests.log" | tail -8
(cd "$OUT" && tar czf d.tgz d && rm -rf d)
