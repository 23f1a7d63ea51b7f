"""Where the time goes: per-kernel GPU time of each form at one point, from torch.profiler.

    python3 -m benchmarks.profile_ops --forms chunk,dplr.chunk --point B=8,T=4096,H=16,K=128,V=128,dtype=bf16 \
        [--mode fwd+bwd] [--iters 5] [--out reports/data/<gpu>]

For each form: warm-up calls (compilation, launch_fitting's choices), then --iters profiled calls of the mode;
every GPU kernel's total time per call, its launch count and its share, largest first, plus the sum against the
call's wall time (the gap is launch overhead and host work). Writes profile-<point>-<mode>.json when --out is
given. Needs CUDA: kernel timings only exist on a GPU.
"""
import argparse
import sys
import time
from collections import defaultdict

import torch

from benchmarks import harness
from benchmarks import registry as R


def kernel_times(step, iters, cuda=True):
    """({kernel name: [ms per call, launches]}, wall ms per call) of `iters` profiled calls of step, after 3
    warm-up calls (compilation, launch choices)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time / 1e3 / iters  # us -> ms per call
            per[e.name][1] += 1
    return dict(per), wall_ms


class Unavailable(Exception):
    pass


def form_step(name, pt, mode, device="cuda"):
    """(step, leaves) of harness.make_step for form `name` on fresh inputs at point pt; Unavailable (with the
    reason) when the form does not import here."""
    form = R.get(name)
    ok, why = R.availability(form)
    if not ok:
        raise Unavailable(why)
    x = R.FAMILIES[form.family].make_inputs(pt["B"], pt["T"], pt["H"], pt["K"], pt["V"], R.DTYPES[pt["dtype"]],
                                            device, seed=0, initial_state=False)
    if form.adapt_inputs is not None:
        x = form.adapt_inputs(x)
    return harness.make_step(form, form.load(), x, mode)


def profile_form(name, pt, mode, iters, device="cuda"):
    try:
        step, _ = form_step(name, pt, mode, device)
    except Unavailable as e:
        return dict(form=name, status="skipped", reason=str(e))
    per, wall_ms = kernel_times(step, iters, device == "cuda")
    total = sum(v[0] for v in per.values())
    kernels = sorted(({"kernel": k, "ms": v[0], "launches": v[1] / iters, "share": v[0] / total if total else 0}
                      for k, v in per.items()), key=lambda r: -r["ms"])
    return dict(form=name, status="ok", mode=mode, wall_ms=wall_ms, kernel_ms=total, kernels=kernels)


def table(res) -> str:
    if res["status"] != "ok":
        return f"{res['form']}: {res['status']} ({res.get('reason', '')})"
    lines = [f"{res['form']} {res['mode']}: kernels {res['kernel_ms']:.3f} ms of {res['wall_ms']:.3f} ms wall "
             "per call"]
    for k in res["kernels"]:
        lines.append(f"  {k['ms']:9.3f} ms {100 * k['share']:5.1f}%  x{k['launches']:<5g} {k['kernel'][:90]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forms", default="chunk,fused_recurrent,parallel,deltaformer,iplr.chunk,dplr.chunk")
    p.add_argument("--point", default="B=8,T=4096,H=16,K=128,V=128,dtype=bf16")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--cpu-check", action="store_true",
                   help="check this script on a CPU (interpreter, no kernel times: every table is empty)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.cpu_check:
        print("profile_ops needs a CUDA GPU (kernel times are GPU times); --cpu-check runs the logic on a CPU",
              file=sys.stderr)
        return 2
    pt = harness.parse_point(a.point)
    results = []
    for name in a.forms.split(","):
        try:
            res = profile_form(name, pt, a.mode, a.iters, device)
        except Exception as e:  # one form's failure does not stop the others
            res = dict(form=name, status="error", reason=f"{type(e).__name__}: {e}")
        results.append(res)
        print(table(res), flush=True)
    if a.out:
        gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        harness.write_point_doc(a.out, "profile", pt, "profile", dict(gpu=gpu), suffix=f"-{a.mode}", mode=a.mode,
                                iters=a.iters, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
