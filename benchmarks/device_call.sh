# The shared start of the one-call device scripts (ab_switch.sh, dplr_switches.sh, visit_followup.sh): source it
# from the repository root with OUT set. It exports TRITON_CACHE_DIR (./.triton_cache) and PYTHONPATH (the repo and
# /tmp/site, where fla's wheel from .whl goes), and sets D=$OUT/d (created), DATA=reports/data/<gpu> and T0, the
# start for at().
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p "$TRITON_CACHE_DIR"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
D=$OUT/d; mkdir -p "$D"; T0=$SECONDS
DATA=reports/data/$(python3 -c 'from benchmarks.harness import device_name, slug; print(slug(device_name()))' \
  2>/dev/null | tail -n 1)

at() { echo "[$((SECONDS - T0)) s] $*"; }

# Peers' autotune results from earlier visits (Triton's *.autotune.json, $DATA/autotune-cache.tgz) into the cache,
# so fla's first calls do not autotune inside the timed steps.
restore_autotune() {
  [ -s "$DATA/autotune-cache.tgz" ] && tar xzf "$DATA/autotune-cache.tgz" -C "$TRITON_CACHE_DIR" \
    && echo "autotune cache from $DATA"
}

# $D/machine.txt (printed too): the GPU and its clocks, torch and triton, the commit, then any words given.
machine_record() {
  { nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version \
      --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit ${DELTACHECK_COMMIT:-?}${1:+ $*}"; } > "$D/machine.txt"
  cat "$D/machine.txt"
}
