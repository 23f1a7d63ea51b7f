"""Accuracy sweep: the error of o, the final state and every gradient of each form against float64, as T grows.

    python3 -m benchmarks.accuracy                     # GPU: T = 64 .. 16384, bf16/fp16/fp32/fp64, ours + fla
    python3 -m benchmarks.accuracy --out reports/data --file accuracy-cpu.json   # CPU: tiny, interpreter

The reference is reference.delta_rule_chunkwise in float64 on the same device (memory-safe at large T, unlike the
token loop), evaluated on the same rounded inputs the op saw, with autograd for its gradients. Errors use
properties/tolerances.py's metric rel_err = ||x - x_ref|| / ||x_ref||; each row carries the dtype's forward and
gradient bounds for comparison (the sweep asserts nothing: it measures how error grows with T). Upstream
gradients do (and dS_T for forms that return the final state) are random. Forms, peers included, share one
input set per (dtype, T).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import registry as R  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    CUDA,
    REPO,
    _available,
    _clean,
    _dump,
    device_name,
    git_info,
    now_iso,
    slug,
    source_hash,
    sync,
)
from benchmarks.runner import KILLED_SLOW, Skip, run_job  # noqa: E402
from properties.tolerances import bound, rel_err  # noqa: E402

GPU_DEFAULTS = dict(T=[64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], dtypes=["bf16", "fp16", "fp32", "fp64"],
                    B=1, H=4, K=128, V=128, point_budget_s=10.0, peers=True)
CPU_DEFAULTS = dict(T=[8, 16, 32, 64, 128, 256], dtypes=["fp16", "fp32", "fp64"], B=1, H=1, K=16, V=16,
                    point_budget_s=60.0, peers=False)
QUANTITIES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "dinitial_state")


def _device():
    return "cuda" if CUDA else "cpu"


def _reference(ctx, task, family):
    """Inputs in the op dtype, upstream gradients, and the float64 reference's outputs and gradients, both with
    the final state in the loss (dS_T) and without it (for forms that do not return it)."""
    key = (task["dtype"], task["B"], task["T"], task["H"], task["K"], task["V"], family.name)
    slot = ctx.cache.get("ref")
    if slot is not None and slot[0] == key:
        return slot[1]
    ctx.cache.pop("ref", None)
    x = family.make_inputs(task["B"], task["T"], task["H"], task["K"], task["V"], R.DTYPES[task["dtype"]],
                           _device(), seed=ctx.config.get("seed", 0) + task["T"], initial_state=True)
    g = torch.Generator(device=_device()).manual_seed(ctx.config.get("seed", 0) + 7 * task["T"] + 1)
    dt = x["q"].dtype
    do = torch.randn(x["v"].shape, generator=g, device=_device(), dtype=torch.float64).to(dt)
    dht = torch.randn(x["initial_state"].shape, generator=g, device=_device(), dtype=torch.float64)
    dht = dht.to(x["initial_state"].dtype)
    ref_fn = R.load(family.reference)
    names = list(family.grad_names)
    leaves = {n: x[n].detach().double().requires_grad_() for n in names}
    t0 = time.time()
    with torch.device(_device()):  # the references allocate masks and identities on the default device
        ro, rht = ref_fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"],
                         initial_state=leaves["initial_state"], output_final_state=True,
                         **family.reference_kwargs)[:2]
    with_ht = torch.autograd.grad((ro, rht), list(leaves.values()), (do.double(), dht.double()),
                                  retain_graph=True, allow_unused=True, materialize_grads=True)
    without_ht = torch.autograd.grad(ro, list(leaves.values()), do.double(), allow_unused=True,
                                     materialize_grads=True)
    sync()
    ref = dict(x=x, do=do, dht=dht, o=ro.detach(), final_state=rht.detach(),
               grads_with_ht=dict(zip(names, (t.detach() for t in with_ht))),
               grads_without_ht=dict(zip(names, (t.detach() for t in without_ht))),
               seconds=time.time() - t0)
    ctx.cache["ref"] = (key, ref)
    return ref


def accuracy_task(task, ctx):
    form = R.get(task["form"])
    fn = _available(ctx, form)
    dt = R.DTYPES[task["dtype"]]
    if form.dtypes and dt not in form.dtypes:
        raise Skip(f"{form.label} does not support {dt}")
    cap = ctx.config.get("caps", {}).get(form.name, form.max_T_accuracy)
    if cap and task["T"] > cap:
        raise Skip(f"T={task['T']} is above this form's cap T<={cap}")
    for r in ctx.find(kind="accuracy", form=form.name, dtype=task["dtype"]):
        if r["T"] < task["T"] and r.get("over_budget"):
            raise Skip(f"over the per-point budget already at T={r['T']}")
        if str(r.get("reason", "")).startswith(KILLED_SLOW):
            raise Skip(f"this form ran past the per-point limit at T={r['T']}")
    family = R.FAMILIES[form.family]
    ref = _reference(ctx, task, family)
    x = ref["x"]
    names = list(family.grad_names)
    leaves = {n: x[n].detach().clone().requires_grad_() for n in names}
    inputs = dict(x, **leaves)
    sync()
    t0 = time.perf_counter()
    o, ht = form.call(fn, inputs, form.final_state, **form.kwargs)
    outs, gouts = [o], [ref["do"]]
    if ht is not None:
        outs.append(ht)
        gouts.append(ref["dht"].to(ht.dtype))
    grads = torch.autograd.grad(outs, list(leaves.values()), gouts, allow_unused=True)
    sync()
    seconds = time.perf_counter() - t0
    rgrads = ref["grads_with_ht"] if ht is not None else ref["grads_without_ht"]
    errors = {"o": rel_err(o, ref["o"])}
    if ht is not None:
        errors["final_state"] = rel_err(ht, ref["final_state"])
    missing = []
    for n, gx in zip(names, grads):
        if gx is None:
            missing.append(n)
            continue
        errors[f"d{n}"] = rel_err(gx, rgrads[n])
    row = dict(status="ok", errors=errors, bound_forward=bound(R.torch_dtype(dt), "forward"),
               bound_gradient=bound(R.torch_dtype(dt), "gradient"), seconds=seconds,
               reference_seconds=ref["seconds"], over_budget=seconds > ctx.config["point_budget_s"],
               o_dtype=str(o.dtype).replace("torch.", ""))
    if missing:
        row["reason"] = "no gradient for " + ", ".join(missing)
    worst = max((v for k, v in errors.items() if k.startswith("d")), default=float("nan"))
    row["summary"] = (f"{form.name:<20} {task['dtype']} T={task['T']}: o {errors['o']:.2e}, "
                      f"worst grad {worst:.2e} ({seconds:.2f} s)")
    return row


def execute(task, ctx):
    return accuracy_task(task, ctx)


def coarse_to_fine(Ts):
    """Order T so that a cut-off run still spans the range: both ends, then midpoints of ever finer halves
    ([64 .. 16384] -> 64, 16384, 1024, 256, 4096, 128, 512, 2048, 8192)."""
    Ts = sorted(set(Ts))
    if len(Ts) <= 2:
        return Ts
    order, spans = [0, len(Ts) - 1], [(0, len(Ts) - 1)]
    while spans:
        nxt = []
        for lo, hi in spans:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                order.append(mid)
                nxt += [(lo, mid), (mid, hi)]
        spans = nxt
    return [Ts[i] for i in order]


def tasks_for(forms, Ts, dtypes, B, H, K, V):
    """Every (T, dtype, form), T coarse to fine; the forms of one (T, dtype) share one reference."""
    return [dict(key=f"accuracy:{f}:{d}:T{T}", kind="accuracy", form=f, dtype=d, B=B, T=T, H=H, K=K, V=V)
            for T in coarse_to_fine(Ts) for d in dtypes for f in forms]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["form", "dtype", "B", "T", "H", "K", "V", "quantity", "rel_err", "bound", "status", "reason"])
        for r in rows:
            if r.get("status") != "ok":
                w.writerow([r["form"], r["dtype"], r["B"], r["T"], r["H"], r["K"], r["V"], "", "", "",
                            r["status"], r.get("reason", "")])
                continue
            for q, e in r["errors"].items():
                b = r["bound_gradient"] if q.startswith("d") else r["bound_forward"]
                w.writerow([r["form"], r["dtype"], r["B"], r["T"], r["H"], r["K"], r["V"], q, e, b, "ok",
                            r.get("reason", "")])


def build_parser():
    d = GPU_DEFAULTS if CUDA else CPU_DEFAULTS
    default_forms = [f.name for f in R.FORMS if f.accuracy and (d["peers"] or f.provider == "ours")]
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default reports/data/<gpu-slug>)")
    p.add_argument("--file", default="accuracy.json", help="file name inside --out (default %(default)s)")
    p.add_argument("--T", default=",".join(map(str, d["T"])), help="sequence lengths (default %(default)s)")
    p.add_argument("--dtypes", default=",".join(d["dtypes"]), help="default %(default)s")
    p.add_argument("--forms", default=",".join(default_forms), help="default %(default)s")
    for n in "BHKV":
        p.add_argument(f"--{n}", type=int, default=d[n], help="default %(default)s")
    p.add_argument("--point-budget-s", type=float, default=d["point_budget_s"],
                   help="a form whose call + backward takes longer skips larger T (default %(default)s)")
    p.add_argument("--task-limit-s", type=float, default=120.0,
                   help="kill a point that runs longer and skip that form's larger T (default %(default)s)")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget (default %(default)s)")
    p.add_argument("--deadline", type=float, help="absolute deadline (time.time()), overrides --budget-s")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    deadline = args.deadline or t0 + args.budget_s
    name = device_name()
    out = args.out or os.path.join(REPO, "reports", "data", slug(name))
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "_work")
    forms = [f for f in args.forms.split(",") if f]
    for f in forms:
        R.get(f)
    dtypes = [d for d in args.dtypes.split(",") if d]
    Ts = [int(t) for t in args.T.split(",") if t]
    tasks = tasks_for(forms, Ts, dtypes, args.B, args.H, args.K, args.V)
    config = dict(point_budget_s=args.point_budget_s, seed=args.seed)
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    print(f"accuracy: {len(tasks)} points on {name}, until {max(0, deadline - t0):.0f} s from now", flush=True)
    rows = run_job(os.path.splitext(args.file)[0], "benchmarks.accuracy:execute", tasks, config, work, deadline,
                   env=env, task_limit_s=args.task_limit_s)
    rows.sort(key=lambda r: (forms.index(r["form"]), dtypes.index(r["dtype"]), r["T"]))
    import platform

    import triton
    doc = dict(schema=1, kind="accuracy", created=now_iso(), argv=list(argv if argv is not None else sys.argv[1:]),
               machine=dict(device=name, slug=slug(name), torch=torch.__version__, triton=triton.__version__,
                            python=platform.python_version(),
                            interpreter=os.environ.get("TRITON_INTERPRET") == "1"),
               git=git_info(), source=source_hash(),
               config=dict(config, T=Ts, dtypes=dtypes, forms=forms, B=args.B, H=args.H, K=args.K, V=args.V,
                           reference="reference.delta_rule_chunkwise (float64, autograd)",
                           metric="properties.tolerances.rel_err"),
               bounds={R.DTYPES[d]: dict(forward=bound(R.torch_dtype(d), "forward"),
                                         gradient=bound(R.torch_dtype(d), "gradient")) for d in dtypes},
               forms={f: dict(label=R.get(f).label, provider=R.get(f).provider, form=R.get(f).form,
                              op=R.get(f).family) for f in forms},
               rows=[_clean(r) for r in rows])
    path = os.path.join(out, args.file)
    _dump(path, doc)
    write_csv(os.path.splitext(path)[0] + ".csv", rows)
    import shutil
    for suffix in (".jsonl", ".current", ".job.json"):
        p = os.path.join(work, os.path.splitext(args.file)[0] + suffix)
        if os.path.exists(p):
            os.remove(p)
    if os.path.isdir(work) and not os.listdir(work):
        shutil.rmtree(work)
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"accuracy: {n['ok']} ok, {n['skipped']} skipped, {n['error']} errors in {time.time() - t0:.0f} s; "
          f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
