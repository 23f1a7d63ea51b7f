#!/usr/bin/env bash
# What GPU visit 18 left, in one device call under the current defaults, one step after another (so no step's timing
# shares the machine): the first call from an empty cache with and without the launchers built in the compile pool
# (first_call_trace shows each compile and launcher build), the DPLR / IPLR cases visit 18's call 2 did not reach,
# the DPLR launch tune on this code (chunk_A_fwd with its new outputs), and the DPLR bf16 accuracy beside fla's on
# the same inputs.
#
#   OUT=/folder DELTACHECK_COMMIT=<sha> bash benchmarks/visit_followup.sh [TOTAL_S]     (carry .whl for fla)
#
# Everything lands in $OUT/d.tgz: first-call traces, tune-*.json and the accuracy point (under d/<name>/), the
# tests' junit and records (merge them into verification-gpu.* with benchmarks.gpu_summary merge-runs). TOTAL_S
# (default 560) bounds the whole call.
set -uo pipefail
TOTAL=${1:-560}
. benchmarks/device_call.sh
P=B=8,T=4096,H=16,K=128,V=128,dtype=bf16
machine_record
for L in 0 1; do  # (each in a fresh process and an empty cache of its own, before anything else loads the machine)
  DELTACHECK_COMPILE_LAUNCHERS=$L TRITON_CACHE_DIR=$(mktemp -d) timeout 60 python3 -m benchmarks.first_call_trace \
    --form dplr.chunk --point $P > "$D/first-trace-launchers$L.log" 2>&1; at "first call trace, launchers $L (rc $?)"
done
LEFT=(properties/test_dplr_ops.py::test_chunk_dplr_half_operands_match_reference
      properties/test_generalized_forms_agree.py::test_chunk_equals_fused_recurrent
      "properties/test_conformance.py::test_matches_float64_reference[iplr.chunk-fp16]"
      "properties/test_conformance.py::test_packed_sequences_equal_each_alone[iplr.chunk-fp16]"
      "properties/test_conformance.py::test_packed_sequences_equal_each_alone[iplr.chunk-fp32]")
DELTACHECK_PROFILE=gpu DELTACHECK_RECORD=$D/verification-left.json timeout -s INT -k 15 200 \
  python3 -m pytest -p no:cacheprovider -n 5 -q "${LEFT[@]}" --junitxml=$D/tests-left.junit.xml \
  > "$D/tests-left.log" 2>&1; at "tests left (rc $?)"
restore_autotune
timeout 170 python3 -m benchmarks.tune_launch --forms dplr.chunk --point $P --warps 2,4,8 --stages 1,2,3 \
  --budget-s 150 --out "$D/tune" > "$D/tune.log" 2>&1; at "tune (rc $?)"
R=$((TOTAL - SECONDS + T0 - 10))  # (the accuracy point gets what the steps before it left)
timeout $R python3 -m benchmarks.harness --point $P --forms dplr.chunk,fla.dplr.chunk --accuracy \
  --budget-s $((R - 10)) --task-limit-s 60 --out "$D/acc" > "$D/acc.log" 2>&1; at "accuracy (rc $?)"
for L in 0 1; do head -1 "$D/first-trace-launchers$L.log"; tail -1 "$D/first-trace-launchers$L.log"; done
tail -16 "$D/tune.log"; tail -20 "$D/acc.log"; grep -E "passed|failed|FAILED" "$D/tests-left.log" | tail -4
(cd "$OUT" && tar czf d.tgz d && rm -rf d)
