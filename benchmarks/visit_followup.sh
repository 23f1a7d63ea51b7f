#!/usr/bin/env bash
# What GPU visit 17 left, in one device call under the current defaults: the DPLR launch tune on the square chunk_h
# and chunk_A, the first call at a new shape (fresh process, empty Triton cache: the goal's own measure) for the
# delta and DPLR chunk forms, the long-T delta point beside fla, a per-kernel profile of our DPLR chunk form and
# fla's, then the DPLR / IPLR conformance and
# generalized-form cases in the time left.
#
#   OUT=/folder DELTACHECK_COMMIT=<sha> bash benchmarks/visit_followup.sh [TOTAL_S]     (carry .whl for fla)
#
# Everything lands in $OUT/d.tgz: tune-*.json, first-call-*.json, point-*.json (under d/<name>/), the tests' junit
# and records (merge them into verification-gpu.* with benchmarks.gpu_summary merge-runs). TOTAL_S (default 560)
# bounds the whole call; each step has its own limit and the tests get what the steps leave.
set -uo pipefail
TOTAL=${1:-560}
. benchmarks/device_call.sh
P=B=8,T=4096,H=16,K=128,V=128,dtype=bf16
machine_record
# first calls before anything fills a cache (first_call.py gives each measurement its own empty one)
timeout 150 python3 -m benchmarks.first_call --forms chunk,dplr.chunk --point $P --ahead 1 --timeout-s 60 \
  --out "$D/first" > "$D/first.log" 2>&1; at "first calls (rc $?)"
restore_autotune
timeout 170 python3 -m benchmarks.tune_launch --forms dplr.chunk --point $P --warps 2,4,8 --stages 1,2,3 \
  --budget-s 150 --out "$D/tune" > "$D/tune.log" 2>&1; at "tune (rc $?)"
timeout 100 python3 -m benchmarks.harness --point B=2,T=16384,H=16,K=128,V=128,dtype=bf16 --forms chunk,fla.chunk \
  --budget-s 40 --task-limit-s 45 --out "$D/longT" > "$D/longT.log" 2>&1; at "long T (rc $?)"
# where fla's DPLR time goes beside ours (per kernel, fwd+bwd): which of our kernels has a faster counterpart
timeout 90 python3 -m benchmarks.profile_ops --forms dplr.chunk,fla.dplr.chunk --point $P --out "$D/prof" \
  > "$D/prof.log" 2>&1; at "profile (rc $?)"
R=$((TOTAL - SECONDS + T0))
DELTACHECK_PROFILE=gpu DELTACHECK_RECORD=$D/verification-conformance.json timeout -s INT -k 15 $R \
  python3 -m pytest -p no:cacheprovider -n 16 -q properties/test_conformance.py \
  properties/test_generalized_forms_agree.py -k "dplr or iplr or generalized" \
  --junitxml=$D/tests.junit.xml > "$D/tests.log" 2>&1; at "tests (rc $?)"
grep -E "first|ahead|dplr|chunk" "$D/first.log" | tail -8; grep -A6 "^form " "$D/longT.log"
tail -30 "$D/tune.log"; head -60 "$D/prof.log"; grep -E "passed|failed|FAILED" "$D/tests.log" | tail -8
(cd "$OUT" && tar czf d.tgz d && rm -rf d)
