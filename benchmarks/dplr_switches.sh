#!/usr/bin/env bash
# A DPLR candidate's visit in one device call: the first call at the point under ON (a fresh process, an empty
# Triton cache), the DPLR chunk at the point with the candidate off (OFF) and on (ON, beside fla's), a per-kernel
# profile under ON (it attributes the gain), then the DPLR / IPLR tests (their conformance and generalized-form
# cases too, every dtype, bf16 included) under ON in the time left, the two slowest cases in a pytest of their own
# beside the rest so a time limit cannot cut them off.
#
#   OUT=/folder DELTACHECK_COMMIT=<sha> [OFF="VAR=0 ..."] [ON="VAR=1 ..."] bash benchmarks/dplr_switches.sh [TOTAL_S]
#   (carry .whl for fla)
#
# OFF and ON are env settings (default: DELTACHECK_DPLR_HALF_STORAGE=0, and none: the defaults); OFF=- skips the
# OFF point (a visit that only verifies and times the defaults). Everything lands in
# $OUT/d.tgz: point-*.json per setting (under d/<name>/), first-call-*.json, the profile, the tests' junit and
# records (merge them into verification-gpu.* with benchmarks.gpu_summary merge-runs). TOTAL_S (default 560) bounds
# the whole call; the tests get what the timings leave.
set -uo pipefail
TOTAL=${1:-560}
OFF=${OFF:-DELTACHECK_DPLR_HALF_STORAGE=0}
ON=${ON:-}
# TESTS (env) narrows the test files when time is short.
TESTS=${TESTS:-properties/test_dplr_ops.py properties/test_iplr_ops.py properties/test_conformance.py \
properties/test_generalized_forms_agree.py}
# SLOW (env): a -k expression for the slowest cases, run with SLOW_N workers of their own from the start.
SLOW=${SLOW:-test_state_splits_at_any_t and dplr and fp32 or test_iplr_with_erase_write_is_the_delta_rule}
SLOW_N=${SLOW_N:-2}  # (REST_N, default 16 - SLOW_N: the other cases' workers)
. benchmarks/device_call.sh
P=B=8,T=4096,H=16,K=128,V=128,dtype=bf16
machine_record "OFF: $OFF; ON: $ON"
# FIRST_FORMS / FIRST_MODES (env): the forms and modes of the first-call step (each a fresh process, empty cache).
env $ON timeout 150 python3 -m benchmarks.first_call --forms "${FIRST_FORMS:-dplr.chunk}" --point $P --ahead 1 \
  --modes "${FIRST_MODES:-fwd,fwd+bwd}" --timeout-s 60 --out "$D/first" > "$D/first.log" 2>&1; at "first call (rc $?)"
restore_autotune
point() { local name=$1 forms=$2; shift 2; env "$@" timeout 100 python3 -m benchmarks.harness --point $P \
  --forms "$forms" --budget-s 40 --task-limit-s 45 --out "$D/$name" > "$D/$name.log" 2>&1; at "$name (rc $?)"; }
[ "$OFF" != "-" ] && point off dplr.chunk $OFF
point on dplr.chunk,fla.dplr.chunk $ON
env $ON timeout 40 python3 -m benchmarks.profile_ops --forms dplr.chunk --point $P --out "$D/prof" \
  > "$D/prof.log" 2>&1; at "profile (rc $?)"
# EXTRA (env): one more command (a micro-benchmark, say), its output in d/extra.log
[ -n "${EXTRA:-}" ] && { env $ON timeout 90 bash -c "$EXTRA" > "$D/extra.log" 2>&1; at "extra (rc $?)"; }
R=$((TOTAL - SECONDS + T0))
tests() { local name=$1 n=$2 sel=$3; env $ON DELTACHECK_PROFILE=gpu DELTACHECK_RECORD=$D/verification-$name.json \
  timeout -s INT -k 15 $R python3 -m pytest -p no:cacheprovider -n $n -q $TESTS -k "$sel" \
  --junitxml=$D/tests-$name.junit.xml > "$D/tests-$name.log" 2>&1; at "tests $name (rc $?)"; }
tests slow $SLOW_N "$SLOW" & tests rest ${REST_N:-$((16 - SLOW_N))} "(dplr or iplr or generalized) and not ($SLOW)"; wait
grep -E "first|ahead" "$D/first.log" | tail -3
for f in off on; do echo "== $f"; grep -A3 "^form " "$D/$f.log"; done
grep " ms " "$D/prof.log" | head -14; [ -n "${EXTRA:-}" ] && tail -30 "$D/extra.log"; grep -hE "passed|failed|FAILED" "$D"/tests-*.log | tail -12
(cd "$OUT" && tar czf d.tgz d && rm -rf d)
