"""Accuracy sweep: the error of o, the final state and every gradient of each form against float64, as T grows.

    python3 -m benchmarks.accuracy                     # GPU: T = 64 .. 16384, bf16/fp16/fp32/fp64, ours + fla
    python3 -m benchmarks.accuracy --out reports/data --file accuracy-cpu.json   # CPU: tiny, interpreter

Each op is held to its family's float64 reference (benchmarks/registry.py) on the same device, evaluated on the
same rounded inputs the op saw, with autograd for its gradients:

    delta rule    reference.delta_rule_chunkwise   memory-safe at any T
    DeltaFormer   reference.deltaformer_solve      T x T float64 solve: T <= 4096, and at a large B H T^2 only
                                                   the first sequences are compared (sequences are independent)
    IPLR / DPLR   reference.iplr_recurrent /       float64 token loops, slow on a GPU: T <= 1024 only; larger
                  reference.dplr_recurrent         T are skipped with that reason

Errors use properties/tolerances.py's metric rel_err = ||x - x_ref|| / ||x_ref||; each row carries the dtype's
forward and gradient bounds for comparison (the sweep asserts nothing: it measures how error grows with T).
Upstream gradients do (and dS_T for forms that return the final state) are random. Forms, peers included, share
one input set per (op, dtype, T). A form whose backward raises NotImplementedError (fla's IPLR chunk and DPLR
fused recurrent forms) gets its forward errors and the reason. `--point` measures one shape instead (the
harness's `--point ... --accuracy` runs it), at T capped to each reference's limit.
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
QUANTITIES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "da", "db", "dgk", "dinitial_state")


def _device():
    return "cuda" if CUDA else "cpu"


def _first(x, n):
    """The first n sequences of every tensor of an input dict (all of them have the batch first)."""
    return {k: t[:n] for k, t in x.items()}


def _reference(ctx, task, family, n):
    """Inputs in the op dtype (all B sequences), upstream gradients, and the float64 reference's outputs and
    gradients for the first n sequences, with the final state in the loss (dS_T) and without it (for forms that
    do not return it); families without a state have only the latter."""
    key = (task["dtype"], task["B"], task["T"], task["H"], task["K"], task["V"], family.name, n)
    slot = ctx.cache.get("ref")
    if slot is not None and slot[0] == key:
        return slot[1]
    ctx.cache.pop("ref", None)
    x = family.make_inputs(task["B"], task["T"], task["H"], task["K"], task["V"], R.DTYPES[task["dtype"]],
                           _device(), seed=ctx.config.get("seed", 0) + task["T"], initial_state=True)
    g = torch.Generator(device=_device()).manual_seed(ctx.config.get("seed", 0) + 7 * task["T"] + 1)
    dt = x["q"].dtype
    do = torch.randn(x["v"].shape, generator=g, device=_device(), dtype=torch.float64).to(dt)
    dht = None
    if family.state:
        dht = torch.randn(x["initial_state"].shape, generator=g, device=_device(), dtype=torch.float64)
        dht = dht.to(x["initial_state"].dtype)
    ref_fn = R.load(family.reference)
    names = list(family.grad_names)
    leaves = {k: t[:n].detach().double().requires_grad_() if k in names else t[:n].double()
              for k, t in x.items()}
    t0 = time.time()
    with torch.device(_device()):  # the references allocate masks and identities on the default device
        ro, rht = family.call_reference(ref_fn, leaves)
    grads_with_ht = None
    if rht is not None:
        with_ht = torch.autograd.grad((ro, rht), [leaves[k] for k in names], (do[:n].double(), dht[:n].double()),
                                      retain_graph=True, allow_unused=True, materialize_grads=True)
        grads_with_ht = dict(zip(names, (t.detach() for t in with_ht)))
    without_ht = torch.autograd.grad(ro, [leaves[k] for k in names], do[:n].double(), allow_unused=True,
                                     materialize_grads=True)
    sync()
    ref = dict(x=x, do=do, dht=dht, n=n, o=ro.detach(), final_state=None if rht is None else rht.detach(),
               grads_with_ht=grads_with_ht, grads_without_ht=dict(zip(names, (t.detach() for t in without_ht))),
               seconds=time.time() - t0)
    ctx.cache["ref"] = (key, ref)
    return ref


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:240]}"


def accuracy_task(task, ctx):
    """One (form, dtype, T) point. The family's reference limits apply: above its T cap the point is skipped,
    unless the task says clip (the harness's point: measure at the cap instead, and say so in T_measured); at a
    large B H T^2 only the first sequences are compared (B_compared)."""
    form = R.get(task["form"])
    fn = _available(ctx, form)
    dt = R.DTYPES[task["dtype"]]
    if form.dtypes and dt not in form.dtypes:
        raise Skip(f"{form.label} does not support {dt}")
    cap = ctx.config.get("caps", {}).get(form.name, form.max_T_accuracy)
    if cap and task["T"] > cap:
        raise Skip(f"T={task['T']} is above this form's cap T<={cap}")
    family = R.FAMILIES[form.family]
    if not family.reference:
        raise Skip(f"{family.name} has no float64 reference (a baseline)")
    T_eff, n = family.reference_limits(task["B"], task["T"], task["H"])
    if T_eff < task["T"] and not task.get("clip"):
        raise Skip(f"T={task['T']} is above the float64 reference's limit T<={T_eff}: {family.reference_note}")
    for r in ctx.find(kind="accuracy", form=form.name, dtype=task["dtype"]):
        if r["T"] < task["T"] and r.get("over_budget"):
            raise Skip(f"over the per-point budget already at T={r['T']}")
        if str(r.get("reason", "")).startswith(KILLED_SLOW):
            raise Skip(f"this form ran past the per-point limit at T={r['T']}")
    ref = _reference(ctx, dict(task, T=T_eff), family, n)
    x = ref["x"]
    names = list(family.grad_names)
    leaves = {k: x[k].detach().clone().requires_grad_() for k in names if k in x}
    inputs = dict(x, **leaves)
    sync()
    t0 = time.perf_counter()
    o, ht = form.call(fn, inputs, form.final_state, **form.kwargs)
    outs, gouts = [o], [ref["do"]]
    if ht is not None and ref["final_state"] is not None:
        outs.append(ht)
        gouts.append(ref["dht"].to(ht.dtype))
    else:
        ht = None
    no_backward = None
    try:
        grads = torch.autograd.grad(outs, list(leaves.values()), gouts, allow_unused=True)
    except NotImplementedError as e:  # fla's forward-only forms
        no_backward = _reason(e)
        grads = [None] * len(leaves)
    sync()
    seconds = time.perf_counter() - t0
    rgrads = ref["grads_with_ht"] if ht is not None else ref["grads_without_ht"]
    errors = {"o": rel_err(o[:n], ref["o"])}
    if ht is not None:
        errors["final_state"] = rel_err(ht[:n], ref["final_state"])
    missing = []
    for k, gx in zip(leaves, grads):
        if gx is None:
            missing.append(k)
            continue
        errors[f"d{k}"] = rel_err(gx[:n], rgrads[k])
    # a form's first point at a dtype compiles its kernels (and fla autotunes): its seconds say nothing of how
    # long a larger T takes, so it never stops the sweep
    seen = ctx.cache.setdefault("compiled", set())
    first = (form.name, dt) not in seen
    seen.add((form.name, dt))
    row = dict(status="ok", errors=errors, bound_forward=bound(R.torch_dtype(dt), "forward"),
               bound_gradient=bound(R.torch_dtype(dt), "gradient"), seconds=seconds, first_call=first,
               reference_seconds=ref["seconds"], over_budget=not first and seconds > ctx.config["point_budget_s"],
               o_dtype=str(o.dtype).replace("torch.", ""), T_measured=T_eff, B_compared=n)
    if no_backward:
        row["reason"] = f"unsupported backward (forward errors only): {no_backward}"
    elif missing:
        row["reason"] = "no gradient for " + ", ".join(missing)
    notes = []
    if T_eff < task["T"]:
        notes.append(f"measured at T={T_eff} (reference limit)")
    if n < task["B"]:
        notes.append(f"first {n} of {task['B']} sequences compared")
    if notes:
        row["reason"] = "; ".join(([row["reason"]] if row.get("reason") else []) + notes)
    worst = max((v for k, v in errors.items() if k.startswith("d")), default=float("nan"))
    row["summary"] = (f"{form.name:<26} {task['dtype']} T={T_eff}: o {errors['o']:.2e}, "
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


def tasks_for(forms, Ts, dtypes, B, H, K, V, clip=False):
    """Every (dtype, T, form): dtypes in the order given (the first one's whole T range is measured before the
    next dtype starts, so a run cut short by its budget still has complete error-vs-T curves), T coarse to fine;
    the forms of one op at one (dtype, T) run together and share one reference (ops in registry order)."""
    order = {f.name: i for i, f in enumerate(R.FORMS)}
    by_op = sorted(forms, key=lambda f: (list(R.FAMILIES).index(R.get(f).family), order[f]))
    return [dict(key=f"accuracy:{f}:{d}:T{T}", kind="accuracy", form=f, dtype=d, B=B, T=T, H=H, K=K, V=V,
                 **({"clip": True} if clip else {}))
            for d in dtypes for T in coarse_to_fine(Ts) for f in by_op]


def point_table(rows) -> str:
    """Text table of accuracy rows: error of o, the final state and the worst gradient against the bounds."""
    head = (f"{'form':<27}{'dtype':<6}{'T':>6}{'seqs':>5}{'o':>10}{'final':>10}{'worst grad':>22}"
            f"{'bound f/g':>19}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['form']:<27}{r['dtype']:<6}{r['T']:>6}{'':>5}  {r['status']}: "
                         f"{r.get('reason', '')}"[:240])
            continue
        e = r["errors"]
        grads = {k: v for k, v in e.items() if k.startswith("d")}
        worst = max(grads, key=grads.get) if grads else None
        fs = f"{e['final_state']:.2e}" if "final_state" in e else "-"
        wg = f"{grads[worst]:.2e} ({worst})" if worst else "-"
        lines.append(f"{r['form']:<27}{r['dtype']:<6}{r.get('T_measured', r['T']):>6}{r.get('B_compared', ''):>5}"
                     f"{e['o']:>10.2e}{fs:>10}{wg:>22}{r['bound_forward']:>10.1e}/{r['bound_gradient']:.1e}"
                     f"  {r.get('reason', '')}"[:260])
    return "\n".join(lines)


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


def summary_table(rows, dtypes) -> str:
    """One line per form: per dtype the worst error / bound over every measured T (forward / gradients) and the
    largest T measured; '-' where nothing was measured."""
    forms = list(dict.fromkeys(r["form"] for r in rows))
    head = f"{'worst error / bound (fwd, grad) @ max T':<27}" + "".join(f"{d:>24}" for d in dtypes)
    lines = [head, "-" * len(head)]
    for f in forms:
        cells = []
        for d in dtypes:
            ok = [r for r in rows if r["form"] == f and r["dtype"] == d and r.get("status") == "ok"]
            if not ok:
                cells.append(f"{'-':>24}")
                continue
            fw = max(v / r["bound_forward"] for r in ok for k, v in r["errors"].items() if not k.startswith("d"))
            gr = [v / r["bound_gradient"] for r in ok for k, v in r["errors"].items() if k.startswith("d")]
            T = max(r.get("T_measured", r["T"]) for r in ok)
            cells.append(f"{fw:>8.2g} {max(gr) if gr else float('nan'):>8.2g} @{T:<5}")
        lines.append(f"{f:<27}" + "".join(cells))
    return "\n".join(lines)


def _reference_notes(forms):
    fams = dict.fromkeys(R.get(f).family for f in forms)
    return [f"{R.FAMILIES[f].label or f}: {R.FAMILIES[f].reference_note}" for f in fams
            if R.FAMILIES[f].reference]


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
    for note in _reference_notes(forms):
        print(f"  reference {note}", flush=True)
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
                           reference="; ".join(_reference_notes(forms)),
                           references={fam: R.FAMILIES[fam].reference_note
                                       for fam in dict.fromkeys(R.get(f).family for f in forms)},
                           metric="properties.tolerances.rel_err"),
               bounds={R.DTYPES[d]: dict(forward=bound(R.torch_dtype(d), "forward"),
                                         gradient=bound(R.torch_dtype(d), "gradient")) for d in dtypes},
               forms={f: dict(label=R.get(f).label, provider=R.get(f).provider, form=R.get(f).form,
                              op=R.get(f).family) for f in forms},
               ops={fam: R.FAMILIES[fam].label for fam in dict.fromkeys(R.get(f).family for f in forms)},
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
    print(summary_table(rows, dtypes), flush=True)
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(f"accuracy: {n['ok']} ok, {n['skipped']} skipped, {n['error']} errors in {time.time() - t0:.0f} s; "
          f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
