#!/usr/bin/env bash
# A/B of one DELTACHECK_* switch on the GPU, in one device call: the point (beside fla) and a long-T point under
# both settings, per-kernel profiles under both, and the launch tune of the form under the new setting.
#
#   OUT=/folder bash benchmarks/ab_switch.sh SWITCH [FORM] [PEER]     e.g. DELTACHECK_FUSED_STATE chunk fla.chunk
#
# Setting 0 is the current default, 1 the candidate. Everything lands in $OUT/d.tgz (logs, point-*.json,
# profile-*.json, tune-*.json); the point tables and profiles are printed at the end. Carry .whl (fla-core) for the
# peer. Each step has its own time limit, so the whole stays inside one device call (~560 s).
set -uo pipefail
SW=$1; FORM=${2:-chunk}; PEER=${3:-fla.chunk}
# peers' autotune results from earlier visits go into the cache first (restore_autotune); what this call adds
# comes back in d/autotune-cache.tgz (commit it over the old one)
. benchmarks/device_call.sh
restore_autotune
P=B=8,T=4096,H=16,K=128,V=128,dtype=bf16; L=B=2,T=16384,H=16,K=128,V=128,dtype=bf16
machine_record switch "$SW"
step() { local limit=$1 name=$2 val=$3; shift 3
  timeout "$limit" env "$SW=$val" python3 -m "$@" > "$D/$name.log" 2>&1; at "$name (rc $?)"; }
# The harness starts no task past its --budget-s but lets a running one go on to --task-limit-s (a peer's first
# call autotunes: fla.chunk's fwd+bwd ran past 100 s on an H100 with no autotune cache), so each step's limit is
# budget + task limit + 10 s, and the point's times are written before its accuracy part.
hstep() { local budget=$1 task=$2; shift 2; step $((budget + task + 10)) "$@" --budget-s "$budget" --task-limit-s "$task"; }
hstep 60 90 pt0 0 benchmarks.harness --point $P --forms $FORM,$PEER --out $D/pt0
hstep 40 30 pt1 1 benchmarks.harness --point $P --forms $FORM --accuracy --out $D/pt1
step 50 prof0 0 benchmarks.profile_ops --forms $FORM --point $P --out $D/prof0
step 50 prof1 1 benchmarks.profile_ops --forms $FORM --point $P --out $D/prof1
step 60 profpeer 0 benchmarks.profile_ops --forms $PEER --point $P --out $D/profpeer
hstep 30 40 lt0 0 benchmarks.harness --point $L --forms $FORM,$PEER --out $D/lt0
hstep 20 20 lt1 1 benchmarks.harness --point $L --forms $FORM --out $D/lt1
R=$((560 - SECONDS + T0))
[ $R -gt 60 ] && step $R tune1 1 benchmarks.tune_launch --forms $FORM --tiles 0,128 --budget-s $((R - 10)) --out $D/tune1
for f in pt0 pt1 lt0 lt1; do echo "== $f"; grep -A8 "^form " "$D/$f.log"; done
for f in prof0 prof1 profpeer; do echo "== $f"; head -24 "$D/$f.log"; done
echo "== tune1"; tail -30 "$D/tune1.log" 2>/dev/null
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$D/autotune-cache.tgz" -T -)
(cd "$OUT" && tar czf d.tgz d && rm -rf d)
