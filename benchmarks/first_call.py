"""First call at a new shape, cold: each form's first forward, or first forward + backward, in a fresh process
with an empty Triton cache (compile, launch choices, no cached kernels), with ops.common.compile_ahead off and on.

    python3 -m benchmarks.first_call --forms chunk,iplr.chunk,dplr.chunk \
        [--point B=8,T=4096,H=16,K=128,V=128,dtype=bf16] [--modes fwd,fwd+bwd] [--ahead 0,1] [--out reports/data/<gpu>]

Each measurement: wall time from the first call's start to the end of its GPU work (synchronized), then the
same for the second call (the warm cost, for comparison). Writes first-call-<point>.json when --out is given.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import harness


def one(name, pt, mode, device):
    """(first call s, second call s) of form `name` in this process."""
    from benchmarks.profile_ops import form_step
    step, _ = form_step(name, pt, mode, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                step()
        else:
            step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def measure(name, pt, mode, ahead, timeout_s):
    """Run `one` in a fresh process with an empty Triton cache and DELTACHECK_COMPILE_AHEAD=ahead."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache, DELTACHECK_COMPILE_AHEAD=str(ahead))
        spec = ",".join(f"{k}={v}" for k, v in pt.items())
        cmd = [sys.executable, "-m", "benchmarks.first_call", "--one", name, "--point", spec, "--modes", mode]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return dict(form=name, mode=mode, ahead=ahead, status="timeout", reason=f"over {timeout_s} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or [""])[-1]
        return dict(form=name, mode=mode, ahead=ahead, status="error", reason=tail[:300])
    return dict(form=name, mode=mode, ahead=ahead, status="ok", **json.loads(lines[-1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forms", default="chunk,iplr.chunk,dplr.chunk")
    p.add_argument("--point", default="B=8,T=4096,H=16,K=128,V=128,dtype=bf16")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--ahead", default="0,1", help="DELTACHECK_COMPILE_AHEAD values to measure")
    p.add_argument("--timeout-s", type=float, default=240)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one form, one mode
    a = p.parse_args(argv)
    pt = harness.parse_point(a.point)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.one:
        first, second = one(a.one, pt, a.modes, device)
        print(json.dumps(dict(first_s=first, second_s=second)))
        return 0
    rows = []
    for name in a.forms.split(","):
        for mode in a.modes.split(","):
            for ahead in (int(x) for x in a.ahead.split(",")):
                r = measure(name, pt, mode, ahead, a.timeout_s)
                rows.append(r)
                got = f"first {r['first_s']:.2f} s, second {r['second_s'] * 1e3:.1f} ms" if r["status"] == "ok" \
                    else f"{r['status']}: {r['reason']}"
                print(f"{name:<14} {mode:<8} compile_ahead={ahead}: {got}", flush=True)
    if a.out:
        gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        harness.write_point_doc(a.out, "first-call", pt, "first_call", dict(gpu=gpu, cpus=os.cpu_count()), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
