#!/usr/bin/env bash
# The DPLR candidates' visit in one device call: the DPLR chunk at the point (beside fla's) under the defaults and
# with every candidate switch on (beside fla's again), per-kernel profiles of both (they attribute the gains), then
# the DPLR / IPLR tests (and their conformance and generalized-form cases, every dtype, bf16 included) with all on in
# the time left.
#
#   OUT=/folder DELTACHECK_COMMIT=<sha> bash benchmarks/dplr_switches.sh [TOTAL_S]     (carry .whl for fla)
#
# Everything lands in $OUT/d.tgz: point-*.json per setting (under d/<name>/), the profile, the tests' junit and
# records (merge them into verification-gpu.* with benchmarks.gpu_summary merge-runs). TOTAL_S (default 560) bounds
# the whole call; the tests get what the timings leave.
set -uo pipefail
TOTAL=${1:-560}
# TESTS (env) narrows the test files when time is short.
TESTS=${TESTS:-properties/test_dplr_ops.py properties/test_iplr_ops.py properties/test_conformance.py \
properties/test_generalized_forms_agree.py}
. benchmarks/device_call.sh
restore_autotune
P=B=8,T=4096,H=16,K=128,V=128,dtype=bf16
machine_record
ALL="DELTACHECK_DPLR_DIAG_DOT=1 DELTACHECK_DPLR_TUNED=1 DELTACHECK_DPLR_HALF_OPERANDS=all"
point() { local name=$1 forms=$2; shift 2; env "$@" timeout 100 python3 -m benchmarks.harness --point $P \
  --forms "$forms" --budget-s 40 --task-limit-s 45 --out "$D/$name" > "$D/$name.log" 2>&1; at "$name (rc $?)"; }
point default dplr.chunk,fla.dplr.chunk DELTACHECK_DPLR_DIAG_DOT=0
point all dplr.chunk,fla.dplr.chunk $ALL
DELTACHECK_DPLR_DIAG_DOT=0 timeout 40 python3 -m benchmarks.profile_ops --forms dplr.chunk --point $P \
  --out "$D/prof-default" > "$D/prof-default.log" 2>&1; at "profile, defaults (rc $?)"
env $ALL timeout 40 python3 -m benchmarks.profile_ops --forms dplr.chunk --point $P --out "$D/prof" \
  > "$D/prof.log" 2>&1; at "profile (rc $?)"
R=$((TOTAL - SECONDS + T0))
env $ALL DELTACHECK_PROFILE=gpu DELTACHECK_RECORD=$D/verification-dplr.json timeout -s INT -k 15 $R \
  python3 -m pytest -p no:cacheprovider -n 16 -q $TESTS -k "dplr or iplr or generalized" \
  --junitxml=$D/tests.junit.xml > "$D/tests.log" 2>&1; at "tests (rc $?)"
for f in default all; do echo "== $f"; grep -A3 "^form " "$D/$f.log"; done
grep " ms " "$D/prof-default.log" | head -14; grep " ms " "$D/prof.log" | head -14; grep -E "passed|failed|FAILED" "$D/tests.log" | tail -12
(cd "$OUT" && tar czf d.tgz d && rm -rf d)
