"""Speed harness: every form of every registered op (benchmarks/registry.py) beside fla and causal SDPA, on
identical inputs in one run, with the machine's own ceilings measured in the same run.

    python3 -m benchmarks.harness                      # sweep + decode (+ --accuracy), -> reports/data/<gpu>/
    python3 -m benchmarks.harness --point B=8,T=4096,H=16,K=128,V=128,dtype=bf16
    python3 -m benchmarks.harness --help

Sweep: T over a list at a fixed token budget (B = max(1, tokens // T)), modes fwd and fwd+bwd, per point the
median time (triton.testing.do_bench, return_mode='median', with its warm-up and L2 flush), tokens/s, TFLOP/s
and GB/s from benchmarks/flops.py, their fractions of the measured ceilings (a large matmul, a large
device-to-device copy counting read + write), the peak memory of one call (max_memory_allocated after a
reset) and the time of the very first call at that shape (compilation and autotuning included). A form that
cannot run a point gets a skip or error reason instead: per-form caps on T, a per-point time budget (a form
whose single call exceeds it skips larger T), a global time budget, and crash isolation (benchmarks/runner.py).

Decode: T = 1 per sequence with a carried state for the fused recurrent forms, batch 1 .. 1024: the state's read
+ write bytes per second against the copy ceiling.

Everything is written under one folder: bench.json, bench.csv (and accuracy.json / .csv, plots/ when asked).
Without CUDA the same code runs tiny shapes in the Triton interpreter (a smoke test of the harness itself).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from benchmarks import flops as F  # noqa: E402
from benchmarks import registry as R  # noqa: E402
from benchmarks.runner import KILLED_SLOW, Skip, run_job  # noqa: E402
from ops.common import utils as U  # noqa: E402

CUDA = torch.cuda.is_available()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("fwd", "fwd+bwd")

GPU_DEFAULTS = dict(T=[256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], tokens=32768, H=[16], K=[128],
                    V=[128], dtypes=["bf16"], decode_batches=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
                    decode_H=16, point_budget_s=2.0, rep_ms=100, warmup_ms=25)
CPU_DEFAULTS = dict(T=[16, 32, 64], tokens=64, H=[2], K=[16], V=[16], dtypes=["fp32"], decode_batches=[1, 4],
                    decode_H=2, point_budget_s=20.0, rep_ms=0, warmup_ms=0)


# --------------------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------------------

def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    s = name.lower().replace("nvidia", "").replace("geforce", "")
    s = "".join(c if c.isalnum() else "-" for c in s)
    return "-".join(p for p in s.split("-") if p) or "unknown"


def nvidia_smi() -> dict:
    fields = ["name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "clocks.max.mem", "power.limit", "temperature.gpu", "pstate"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            return {"error": out.stderr.strip()[:200]}
        vals = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
        return dict(zip(fields, vals))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def device_name() -> str:
    """The GPU's name without creating a CUDA context in this (supervisor) process."""
    if not CUDA:
        return "cpu"
    smi = nvidia_smi()
    if smi.get("name"):
        return smi["name"]
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "gpu"


def git_info() -> dict:
    def git(*a):
        try:
            r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except Exception:
            return None
    given = os.environ.get("DELTACHECK_COMMIT")
    if given:  # a copied working tree (the GPU machine's) may carry a stale .git: the sender names the commit
        return dict(commit=given, dirty=None, source="DELTACHECK_COMMIT")
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=commit or "unknown", dirty=bool(status) if status is not None else None)


def source_hash() -> str:
    """sha256 over ops/, reference/ and benchmarks/ sources: identifies the code even without git."""
    h = hashlib.sha256()
    for top in ("ops", "reference", "benchmarks"):
        for root, dirs, files in sorted(os.walk(os.path.join(REPO, top))):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    p = os.path.join(root, f)
                    h.update(os.path.relpath(p, REPO).encode())
                    with open(p, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:16]


def _version(dist_names, module=None):
    from importlib import metadata
    for d in dist_names:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_task(task, ctx):
    import triton
    info = dict(status="ok", torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), platform=platform.platform(),
                fla=_version(["fla-core", "flash-linear-attention"]), cpu=platform.processor() or platform.machine(),
                interpreter=os.environ.get("TRITON_INTERPRET") == "1", switches=U.switches())
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, slug=slug(p.name), sm_count=p.multi_processor_count, total_memory=p.total_memory,
                    compute_capability=f"{p.major}.{p.minor}")
        for a in ("L2_cache_size", "clock_rate", "memory_clock_rate", "memory_bus_width",
                  "shared_memory_per_block_optin", "regs_per_multiprocessor"):
            if hasattr(p, a):
                info[a] = getattr(p, a)
        info["nvidia_smi"] = nvidia_smi()
    else:
        info.update(gpu=None, slug="cpu")
    return info


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------

def sync():
    if CUDA:
        torch.cuda.synchronize()


_FLUSH = {}


def _flush_l2():
    if CUDA:
        if "buf" not in _FLUSH:
            _FLUSH["buf"] = torch.empty(256 * 2 ** 20 // 4, dtype=torch.int32, device="cuda")
        _FLUSH["buf"].zero_()


def _elapsed_ms(step) -> float:
    if CUDA:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def measure(step, point_budget_s: float, rep_ms: float, warmup_ms: float) -> dict:
    """first call (synchronised wall time), peak memory of one call, then the median time:
    do_bench(return_mode='median') when a call is short, else a few event-timed calls after an L2 flush, or
    a single call when even that exceeds the per-point budget (over_budget: larger T is then skipped)."""
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    mem = {}
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated()
        mem = dict(mem_peak_bytes=peak, mem_extra_bytes=peak - base)
    _flush_l2()
    est = _elapsed_ms(step)
    out = dict(first_call_ms=first_ms, **mem)
    if est > point_budget_s * 1e3:
        return dict(out, ms=est, timing="single call", n_runs=1, over_budget=True)
    if not CUDA or est > max(rep_ms, 1) / 4:
        n = 3 if est * 3 < point_budget_s * 1e3 else 1
        times = [est]
        for _ in range(n - 1):
            _flush_l2()
            times.append(_elapsed_ms(step))
        return dict(out, ms=statistics.median(times), timing="events", n_runs=len(times), over_budget=False)
    import triton.testing
    ms = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return dict(out, ms=float(ms), timing="do_bench", n_runs=None, over_budget=False)


# --------------------------------------------------------------------------------------------------------------
# Task executors (run in the worker process)
# --------------------------------------------------------------------------------------------------------------

def _device():
    return "cuda" if CUDA else "cpu"


def _available(ctx, form):
    avail = ctx.cache.setdefault("available", {})
    if form.name not in avail:
        avail[form.name] = R.availability(form)
    ok, why = avail[form.name]
    if not ok:
        raise Skip(why)
    return form.load()


def _inputs(ctx, form, task, initial_state=False):
    """One shared set of inputs per op and shape (every form of an op at a point sees the same values); adapted
    layouts cached beside it."""
    key = (form.family, task["dtype"], task["B"], task["T"], task["H"], task["K"], task["V"], initial_state)
    slot = ctx.cache.get("inputs")
    if slot is None or slot[0] != key:
        ctx.cache.pop("inputs", None)
        fam = R.FAMILIES[form.family]
        x = fam.make_inputs(task["B"], task["T"], task["H"], task["K"], task["V"], R.DTYPES[task["dtype"]],
                            _device(), seed=ctx.config.get("seed", 0), initial_state=initial_state)
        slot = (key, x, {})
        ctx.cache["inputs"] = slot
    _, x, adapted = slot
    if form.adapt_inputs is None:
        return x
    if form.adapt_inputs not in adapted:
        adapted[form.adapt_inputs] = form.adapt_inputs(x)
    return adapted[form.adapt_inputs]


def _check_point(ctx, form, task):
    dt = R.DTYPES[task["dtype"]]
    if form.dtypes and dt not in form.dtypes:
        raise Skip(f"{form.label} does not support {dt}")
    cap = ctx.config.get("caps", {}).get(form.name, form.max_T)
    if cap and task["T"] > cap:
        raise Skip(f"T={task['T']} is above this form's cap T<={cap} (raise it with --cap {form.name}=N)")
    same = dict(kind=task["kind"], form=form.name, mode=task["mode"], dtype=task["dtype"], H=task["H"],
                K=task["K"], V=task["V"])
    for r in ctx.find(**same):
        if r["T"] < task["T"] and r.get("over_budget"):
            raise Skip(f"over the per-point budget already at T={r['T']} ({r['ms']:.0f} ms a call)")
        if r["T"] < task["T"] and str(r.get("reason", "")).startswith("OutOfMemory"):
            raise Skip(f"out of memory already at T={r['T']}")
    for r in ctx.find(kind=task["kind"], form=form.name, mode=task["mode"], dtype=task["dtype"]):
        if str(r.get("reason", "")).startswith(KILLED_SLOW):
            raise Skip(f"this form and mode ran past the per-point limit at T={r['T']}")


def make_step(form, fn, x, mode):
    """The timed callable for one mode, and the leaves whose .grad it fills. fwd: one call (outputs dropped;
    the final state is not asked for). fwd+bwd: the call, then o.backward(do) with a fixed random do into fresh
    gradients (set to None at the start of every step, so nothing accumulates)."""
    if mode == "fwd":
        def step():
            form.call(fn, x, False, **form.kwargs)
        return step, []
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be fwd or fwd+bwd, got {mode!r}")
    grads = R.FAMILIES[form.family].grad_names
    xg = {n: (t.detach().requires_grad_() if n in grads else t) for n, t in x.items()}
    leaves = [t for n, t in xg.items() if n in grads]
    do = torch.randn_like(x["v"])

    def step():
        for t in leaves:
            t.grad = None
        o, _ = form.call(fn, xg, False, **form.kwargs)
        o.backward(do)
    return step, leaves


def sweep_task(task, ctx):
    form = R.get(task["form"])
    fn = _available(ctx, form)
    _check_point(ctx, form, task)
    x = _inputs(ctx, form, task)
    mode = task["mode"]
    step, leaves = make_step(form, fn, x, mode)
    cold = not any(r.get("status") == "ok" for r in ctx.find(kind=task["kind"], form=form.name, mode=mode,
                                                                 dtype=task["dtype"]))
    cfg = ctx.config
    try:
        res = measure(step, cfg["point_budget_s"], cfg["rep_ms"], cfg["warmup_ms"])
    except NotImplementedError as e:  # a forward-only peer (fla's IPLR chunk, DPLR fused recurrent): found by trying
        first = (str(e).strip().splitlines() or [""])[0]
        raise Skip(f"unsupported: {type(e).__name__}: {first[:240]}") from None
    for t in leaves:
        t.grad = None
    B, T, H, K, V = (task[n] for n in "BTHKV")
    fl = F.flops(form.flops_model, mode, B, T, H, K, V)
    eb = F.DTYPE_BYTES[task["dtype"]]
    by = F.io_bytes(R.FAMILIES[form.family].bytes_model, mode, B, T, H, K, V, eb)
    s = res["ms"] * 1e-3
    row = dict(status="ok", **res, cold=cold, tokens=B * T, tokens_per_s=B * T / s, flops=fl, bytes=by,
               tflops=fl / s / 1e12, gbps=by / s / 1e9, intensity=F.intensity(fl, by))
    if form.name == "sdpa":
        row["backend"] = R.sdpa_backend(x["q"], x["v"])
    elif form.name == "sdpa.default":
        row["backend"] = "default"
    row["summary"] = (f"{form.name:<26} {mode:<7} {task['dtype']} B={B} T={T}: {res['ms']:.3f} ms, "
                      f"{row['tokens_per_s'] / 1e6:.2f} Mtok/s, {row['tflops']:.1f} TFLOP/s")
    return row


def decode_task(task, ctx):
    form = R.get(task["form"])
    fn = _available(ctx, form)
    _check_point(ctx, form, task)
    N, H, K, V = task["N"], task["H"], task["K"], task["V"]
    x = R.FAMILIES[form.family].make_inputs(N, 1, H, K, V, R.DTYPES[task["dtype"]], _device(),
                                            seed=ctx.config.get("seed", 0), initial_state=True)

    def step():
        with torch.no_grad():
            form.call(fn, x, True, **form.kwargs)
    cfg = ctx.config
    # decode calls take microseconds: a shorter do_bench window still averages hundreds of them
    res = measure(step, cfg["point_budget_s"], min(cfg["rep_ms"], 40), min(cfg["warmup_ms"], 10))
    eb = F.DTYPE_BYTES[task["dtype"]]
    by = F.decode_bytes(N, H, K, V, eb, model=R.FAMILIES[form.family].bytes_model)
    sb = F.decode_state_bytes(N, H, K, V)
    s = res["ms"] * 1e-3
    return dict(status="ok", **res, bytes=by, state_bytes=sb, gbps=by / s / 1e9, state_gbps=sb / s / 1e9,
                tokens_per_s=N / s, us=res["ms"] * 1e3,
                summary=f"decode {form.name:<20} N={N}: {res['ms'] * 1e3:.1f} us, {sb / s / 1e9:.0f} GB/s state")


def _ceiling_reps(ctx):
    """(rep_ms, warmup_ms) for ceilings: longer than the sweep's, so clocks settle from idle."""
    if not CUDA:
        return 0, 0
    return max(ctx.config["rep_ms"], 400), max(ctx.config["warmup_ms"], 300)


def ceiling_task(task, ctx):
    """Measured ceilings: a large matmul (TFLOP/s) per dtype, a large device-to-device copy (GB/s, read+write)."""
    dev = _device()
    if task["what"] == "copy":
        nbytes = (1 << 30) if CUDA else (64 << 20)
        src = torch.randn(nbytes // 4, device=dev)
        dst = torch.empty_like(src)
        res = measure(lambda: dst.copy_(src), 10.0, *_ceiling_reps(ctx))
        return dict(status="ok", ms=res["ms"], timing=res["timing"], bytes=2 * nbytes,
                    gbps=2 * nbytes / (res["ms"] * 1e-3) / 1e9, value=2 * nbytes / (res["ms"] * 1e-3) / 1e9,
                    unit="GB/s", summary=f"copy ceiling {2 * nbytes / (res['ms'] * 1e-3) / 1e9:.0f} GB/s")
    name = task["dtype"]
    dt = torch.float32 if name == "tf32" else R.torch_dtype(name)
    n = (8192 if dt in (torch.float16, torch.bfloat16) else 4096) if CUDA else 256
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    c = torch.empty(n, n, device=dev, dtype=dt)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    try:
        res = measure(lambda: torch.matmul(a, b, out=c), 10.0, *_ceiling_reps(ctx))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    tf = 2 * n ** 3 / (res["ms"] * 1e-3) / 1e12
    return dict(status="ok", ms=res["ms"], timing=res["timing"], n=n, tflops=tf, value=tf, unit="TFLOP/s",
                summary=f"matmul ceiling {name} {n}^3: {tf:.1f} TFLOP/s")


def execute(task, ctx):
    return {"machine": machine_task, "ceiling": ceiling_task, "sweep": sweep_task, "point": sweep_task,
            "decode": decode_task}[task["kind"]](task, ctx)


# --------------------------------------------------------------------------------------------------------------
# Task lists
# --------------------------------------------------------------------------------------------------------------

def _ceiling_dtype(dtype: str) -> str:
    return R.SHORT[R.DTYPES[dtype]]


def ceiling_tasks(dtypes):
    need = ["bf16", "tf32", "fp32"] + [_ceiling_dtype(d) for d in dtypes]
    seen = []
    for d in need:
        if d not in seen:
            seen.append(d)
    return ([dict(key="ceiling:copy", kind="ceiling", what="copy")]
            + [dict(key=f"ceiling:matmul:{d}", kind="ceiling", what="matmul", dtype=d) for d in seen])


def point_key(kind, form, mode, dtype, B, T, H, K, V):
    return f"{kind}:{form}:{mode}:{dtype}:B{B}:T{T}:H{H}:K{K}:V{V}"


def sweep_tasks(forms, Ts, tokens, Hs, Ks, Vs, dtypes, modes, kind="sweep"):
    """Ordered for a time budget: the first (dtype, H, K, V) config over all T first, every form and mode at a
    T together (they share one input set), then the other configs."""
    tasks = []
    for dtype in dtypes:
        for H in Hs:
            for K, V in zip(Ks, Vs):
                for T in Ts:
                    B = max(1, tokens // T)
                    for f in forms:
                        for mode in modes:
                            tasks.append(dict(key=point_key(kind, f, mode, dtype, B, T, H, K, V), kind=kind,
                                              form=f, mode=mode, dtype=dtype, B=B, T=T, H=H, K=K, V=V))
    return tasks


def decode_tasks(forms, batches, H, K, V, dtype):
    return [dict(key=f"decode:{f}:{dtype}:N{N}:H{H}:K{K}:V{V}", kind="decode", form=f, mode="decode",
                 dtype=dtype, N=N, B=N, T=1, H=H, K=K, V=V)
            for N in batches for f in forms if R.get(f).decode]


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------

def ceilings_of(rows) -> dict:
    out = dict(matmul_tflops={}, copy_gbps=None)
    for r in rows:
        if r.get("kind") != "ceiling" or r.get("status") != "ok":
            continue
        if r["what"] == "copy":
            out["copy_gbps"] = r["gbps"]
        else:
            out["matmul_tflops"][r["dtype"]] = r["tflops"]
    return out


def add_fractions(rows, ceilings) -> None:
    """Fractions of the measured ceilings: TFLOP/s over the input dtype's matmul ceiling (fp32: IEEE fp32),
    GB/s over the copy ceiling, and TFLOP/s over the roofline min(peak, intensity x bandwidth)."""
    bw = ceilings.get("copy_gbps")
    for r in rows:
        if r.get("status") != "ok":
            continue
        peak = ceilings["matmul_tflops"].get(_ceiling_dtype(r["dtype"]))
        if bw and r.get("gbps") is not None:
            r["frac_copy_bw"] = r["gbps"] / bw
        if r.get("tflops") is not None and peak:
            r["frac_peak_flops"] = r["tflops"] / peak
            if bw:
                r["frac_roofline"] = r["tflops"] * 1e12 / F.roofline(r["intensity"], peak * 1e12, bw * 1e9)


CSV_FIELDS = ["kind", "form", "mode", "dtype", "B", "N", "T", "H", "K", "V", "status", "ms", "first_call_ms",
              "tokens_per_s", "tflops", "gbps", "state_gbps", "frac_peak_flops", "frac_copy_bw", "frac_roofline",
              "mem_peak_bytes", "mem_extra_bytes", "timing", "cold", "backend", "reason"]


def write_csv(path, rows, fields=CSV_FIELDS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def peer_table(rows) -> str:
    """Text tables, one per op: per mode and T, ms of each of the op's forms and of the baselines (SDPA)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("kind") in ("sweep", "point")]
    present = [f.name for f in R.FORMS if any(r["form"] == f.name for r in rows)]
    base = [f for f in present if R.op_of(f) is None]
    lines = []
    for op in R.OPS:
        forms = [f for f in present if R.op_of(f) == op]
        if not forms:
            continue
        forms += base
        for mode in MODES:
            sel = [r for r in rows if r.get("mode") == mode and r["form"] in forms]
            if not sel:
                continue
            lines.append(f"\n{R.FAMILIES[op].label}, {mode}: ms per call (-: skipped/error; see bench.json)")
            lines.append(f"{'T':>7} {'B':>4} " + " ".join(f"{f:>24}" for f in forms))
            for T in sorted({r["T"] for r in sel}):
                cells = []
                for f in forms:
                    r = next((r for r in ok if r["mode"] == mode and r["T"] == T and r["form"] == f), None)
                    cells.append(f"{r['ms']:>24.3f}" if r else f"{'-':>24}")
                B = next(r["B"] for r in sel if r["T"] == T)
                lines.append(f"{T:>7} {B:>4} " + " ".join(cells))
    return "\n".join(lines)


def point_table(rows) -> str:
    """Text table of the point rows, grouped by op (each op's forms, then the baselines)."""
    head = (f"{'form':<26}{'mode':<9}{'ms':>10}{'Mtok/s':>10}{'TFLOP/s':>9}{'GB/s':>8}{'%peak':>7}{'%bw':>6}"
            f"{'mem GiB':>9}{'first s':>9}  note")
    lines = [head, "-" * len(head)]
    pts = [r for r in rows if r.get("kind") == "point"]
    order = {f.name: i for i, f in enumerate(R.FORMS)}
    groups = list(R.OPS) + [None]
    pts.sort(key=lambda r: (groups.index(R.op_of(r["form"])) if R.op_of(r["form"]) in groups else len(groups),
                            order.get(r["form"], len(order))))
    for r in pts:
        if r["status"] != "ok":
            lines.append(f"{r['form']:<26}{r['mode']:<9}  {r['status']}: {r.get('reason', '')}"[:200])
            continue
        pct = lambda v: f"{100 * v:.0f}" if v is not None else "-"  # noqa: E731
        mem = r.get("mem_peak_bytes")
        lines.append(f"{r['form']:<26}{r['mode']:<9}{r['ms']:>10.3f}{r['tokens_per_s'] / 1e6:>10.2f}"
                     f"{r['tflops']:>9.1f}{r['gbps']:>8.0f}{pct(r.get('frac_peak_flops')):>7}"
                     f"{pct(r.get('frac_copy_bw')):>6}{(mem or 0) / 2 ** 30:>9.2f}{r['first_call_ms'] / 1e3:>9.2f}"
                     f"  {r.get('backend', '')}")
    return "\n".join(lines)


def parse_point(spec: str) -> dict:
    out = dict(B=8, T=4096, H=16, K=128, V=128, dtype="bf16")
    for part in filter(None, spec.replace(" ", "").split(",")):
        k, _, v = part.partition("=")
        if k not in out:
            raise SystemExit(f"--point: unknown field {k!r} (B, T, H, K, V, dtype)")
        out[k] = v if k == "dtype" else int(v)
    if out["dtype"] not in R.DTYPES:
        raise SystemExit(f"--point: unknown dtype {out['dtype']!r}")
    return out


def point_tag(pt: dict) -> str:
    """A point's part of the file names written for it (point-, profile-, tune-, first-call-<tag>.json)."""
    return f"B{pt['B']}-T{pt['T']}-H{pt['H']}-K{pt['K']}-V{pt['V']}-{pt['dtype']}"


def write_point_doc(out_dir, prefix, pt, kind, machine, suffix="", **fields) -> str:
    """<out_dir>/<prefix>-<point tag><suffix>.json holding kind, created, point, git, machine and `fields` (the
    profile, tune and first-call files); returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{prefix}-{point_tag(pt)}{suffix}.json")
    with open(path, "w") as f:
        json.dump(dict(kind=kind, created=now_iso(), point=pt, git=git_info(), machine=machine, **fields), f,
                  indent=1)
    print(f"wrote {path}")
    return path


def point_doc(rows, pt, config, **fields):
    """The point-<tag>.json document of a point run's rows (machine, ceilings and point rows) and its ceilings."""
    ceil = ceilings_of(rows)
    add_fractions([r for r in rows if r["kind"] == "point"], ceil)
    doc = dict(schema=1, kind="point", created=now_iso(), config=config, point=pt, machine=_machine(rows),
               git=git_info(), ceilings=ceil, forms=_forms_meta(),
               rows=[_clean(r) for r in rows if r["kind"] == "point"], **fields)
    return doc, ceil


def _recovered_rows(work, name):
    """The rows a stopped run_job left in work/<name>.jsonl, one per task of its job file: the task that was running
    marked cut off, the others not measured (None when the job never started)."""
    from benchmarks.runner import read_rows
    try:
        with open(os.path.join(work, f"{name}.job.json")) as f:
            job = json.load(f)
    except OSError:
        return None, None
    by_key = {}
    for r in read_rows(os.path.join(work, f"{name}.jsonl")):
        by_key.setdefault(r["key"], r)
    try:
        with open(os.path.join(work, f"{name}.current")) as f:
            current = f.read().strip()
    except OSError:
        current = ""

    def missing(t):
        if t["key"] == current:
            return {**t, "status": "error", "reason": "cut off: the run was stopped while this point ran"}
        return {**t, "status": "skipped", "reason": "not measured: the run was stopped before this point finished"}
    return [by_key.get(t["key"]) or missing(t) for t in job["tasks"]], job


def recover_point(run_dir, out=None) -> str:
    """Write point-<tag>.json from the rows a stopped `--point` run left in run_dir/_work (the runner appends each
    row as it is measured; the harness assembles them only at the end, so a run killed from outside, e.g. by a
    device call's time limit, leaves its measurements there and no JSON), with the accuracy rows at the point when
    that part had started. created is when the last row was written (the rows file's modification time); the
    commit is DELTACHECK_COMMIT's (the stopped run's, not this checkout's)."""
    if not os.environ.get("DELTACHECK_COMMIT"):
        raise SystemExit("--recover needs DELTACHECK_COMMIT=<the stopped run's commit>")
    work = os.path.join(run_dir, "_work")
    rows, job = _recovered_rows(work, "point")
    if rows is None:
        raise SystemExit(f"no point job in {work}")
    pt = next({k: t[k] for k in ("B", "T", "H", "K", "V", "dtype")} for t in job["tasks"] if t["kind"] == "point")
    doc, _ = point_doc(rows, pt, job["config"], argv=None, source=None,
                       recovered="assembled by `harness --recover` from the runner's rows (_work/point.jsonl): the "
                                 "harness was stopped before it wrote this file")
    doc["created"] = datetime.datetime.fromtimestamp(os.path.getmtime(os.path.join(work, "point.jsonl")),
                                                     datetime.timezone.utc).isoformat(timespec="seconds")
    acc_rows, _ = _recovered_rows(work, "point-accuracy")
    if acc_rows:
        doc["accuracy"] = [_clean(r) for r in acc_rows]
    os.makedirs(out or run_dir, exist_ok=True)
    path = os.path.join(out or run_dir, f"point-{point_tag(pt)}.json")
    _dump(path, doc)
    print(point_table(rows))
    if acc_rows:
        from benchmarks import accuracy
        print(accuracy.point_table(acc_rows))
    print(f"wrote {path}")
    return path


def ints(s):
    return [int(x) for x in str(s).split(",") if x]


def strs(s):
    return [x for x in str(s).split(",") if x]


def build_parser():
    d = GPU_DEFAULTS if CUDA else CPU_DEFAULTS
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.harness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults shown are this machine's (" + ("CUDA" if CUDA else
                                       "no CUDA: tiny shapes in the Triton interpreter") + ").")
    p.add_argument("--out", help="output folder (default reports/data/<gpu-slug>)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget for everything this command runs, accuracy included (default 420)")
    p.add_argument("--tokens", type=int, default=d["tokens"], help="token budget B*T per point (default %(default)s)")
    p.add_argument("--T", default=",".join(map(str, d["T"])), help="sequence lengths (default %(default)s)")
    p.add_argument("--H", default=",".join(map(str, d["H"])), help="head counts (default %(default)s)")
    p.add_argument("--K", default=",".join(map(str, d["K"])), help="key head sizes, paired with --V")
    p.add_argument("--V", default=",".join(map(str, d["V"])), help="value head sizes, paired with --K")
    p.add_argument("--dtypes", default=",".join(d["dtypes"]), help="dtypes: bf16,fp16,fp32,fp64 (default %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="fwd and/or fwd+bwd")
    p.add_argument("--forms", default=",".join(f.name for f in R.FORMS),
                   help="forms from benchmarks/registry.py (default: all: %(default)s)")
    p.add_argument("--cap", action="append", default=[], metavar="FORM=T",
                   help="override a form's cap on T (e.g. parallel=32768); repeatable")
    p.add_argument("--point-budget-s", type=float, default=d["point_budget_s"],
                   help="a form whose single call takes longer skips larger T (default %(default)s)")
    p.add_argument("--task-limit-s", type=float, default=180.0,
                   help="kill a point (first call and autotuning included) that runs longer, skip the rest of that "
                        "form and mode, and go on in a fresh worker (default %(default)s)")
    p.add_argument("--rep-ms", type=float, default=d["rep_ms"], help="do_bench rep (ms)")
    p.add_argument("--warmup-ms", type=float, default=d["warmup_ms"], help="do_bench warm-up (ms)")
    p.add_argument("--decode-batches", default=",".join(map(str, d["decode_batches"])),
                   help="decode batch sizes (default %(default)s)")
    p.add_argument("--decode-dtype", default=d["dtypes"][0])
    p.add_argument("--no-sweep", action="store_true", help="skip the T sweep")
    p.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    p.add_argument("--point", metavar="B=8,T=4096,H=16,K=128,V=128,dtype=bf16",
                   help="time exactly one configuration for every form, fwd and fwd+bwd, print a table, and stop")
    p.add_argument("--accuracy", action="store_true",
                   help="also run the accuracy sweep (benchmarks/accuracy.py) inside the budget; with --point, the "
                        "error vs float64 of every form at the point (T capped at each reference's limit)")
    p.add_argument("--accuracy-budget-s", type=float, default=110.0,
                   help="time reserved for --accuracy out of --budget-s (default %(default)s)")
    p.add_argument("--plots", action="store_true", help="write PNG plots to OUT/plots (needs matplotlib)")
    p.add_argument("--tar", metavar="PATH", help="also pack the output folder into this .tar.gz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recover", metavar="RUN_DIR",
                   help="write the point JSON of a --point run that was stopped before it wrote it, from the rows "
                        "in RUN_DIR/_work (with DELTACHECK_COMMIT=<that run's commit>; --out: where, default RUN_DIR)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.recover:
        recover_point(args.recover, args.out)
        return 0
    t_start = time.time()
    deadline = t_start + args.budget_s
    name = device_name()
    out = args.out or os.path.join(REPO, "reports", "data", slug(name))
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "_work")
    if os.path.isdir(work):
        shutil.rmtree(work)
    forms = strs(args.forms)
    for f in forms:
        R.get(f)
    caps = {}
    for c in args.cap:
        k, _, v = c.partition("=")
        R.get(k)
        caps[k] = int(v) if v and v.lower() != "none" else None
    dtypes = strs(args.dtypes)
    for dt in dtypes + [args.decode_dtype]:
        if dt not in R.DTYPES:
            raise SystemExit(f"unknown dtype {dt!r}")
    config = dict(caps=caps, point_budget_s=args.point_budget_s, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms,
                  seed=args.seed)
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    print(f"device: {name}; output: {out}; budget {args.budget_s:.0f} s", flush=True)

    if args.point:
        pt = parse_point(args.point)
        tasks = [dict(key="machine", kind="machine")] + ceiling_tasks([pt["dtype"]])
        for f in forms:
            for mode in strs(args.modes):
                tasks.append(dict(key=point_key("point", f, mode, pt["dtype"], pt["B"], pt["T"], pt["H"], pt["K"],
                                                pt["V"]), kind="point", form=f, mode=mode, **pt))
        # with --accuracy, part of the budget (--accuracy-budget-s, at most 40 %) is kept for the error at the point
        acc_reserve = min(args.accuracy_budget_s, 0.4 * args.budget_s) if args.accuracy else 0.0
        rows = run_job("point", "benchmarks.harness:execute", tasks, config, work, deadline - acc_reserve, env=env,
                       task_limit_s=args.task_limit_s)
        doc, ceil = point_doc(rows, pt, config, argv=sys.argv[1:], source=source_hash())
        acc_rows = []
        path = os.path.join(out, f"point-{point_tag(pt)}.json")
        _dump(path, doc)  # the times first: a run stopped during the accuracy part still leaves them
        if args.accuracy:  # the error at the point (T capped at each reference's limit), inside the same budget
            from benchmarks import accuracy
            acc_forms = [f for f in forms if R.get(f).accuracy]
            acc_tasks = accuracy.tasks_for(acc_forms, [pt["T"]], [pt["dtype"]], pt["B"], pt["H"], pt["K"], pt["V"],
                                           clip=True)
            acc_rows = run_job("point-accuracy", "benchmarks.accuracy:execute", acc_tasks,
                               dict(config, point_budget_s=max(args.point_budget_s, 60.0)), work, deadline, env=env,
                               task_limit_s=args.task_limit_s)
            doc["accuracy"] = [_clean(r) for r in acc_rows]
            doc["references"] = {f: R.FAMILIES[f].reference_note for f in dict.fromkeys(R.get(n).family
                                                                                         for n in acc_forms)}
            _dump(path, doc)
        shutil.rmtree(work, ignore_errors=True)
        print("\n" + point_table(rows))
        print(f"\nceilings: copy {ceil['copy_gbps'] or float('nan'):.0f} GB/s; matmul "
              + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in ceil["matmul_tflops"].items()))
        if acc_rows:
            from benchmarks import accuracy
            print("\nerror vs float64 at the point (rel_err; T and sequences compared as the reference allows):")
            print(accuracy.point_table(acc_rows))
        print(f"wrote {path}")
        return 0

    acc_budget = args.accuracy_budget_s if args.accuracy else 0.0
    bench_deadline = deadline - acc_budget
    first_cfg = [dict(H=ints(args.H)[0], K=ints(args.K)[0], V=ints(args.V)[0], dtype=dtypes[0])]
    tasks = [dict(key="machine", kind="machine")] + ceiling_tasks(dtypes)
    Ts = ints(args.T)
    if not args.no_sweep:
        primary = sweep_tasks(forms, Ts, args.tokens, ints(args.H)[:1], ints(args.K)[:1], ints(args.V)[:1],
                              dtypes[:1], strs(args.modes))
        everything = sweep_tasks(forms, Ts, args.tokens, ints(args.H), ints(args.K), ints(args.V), dtypes,
                                 strs(args.modes))
        keys = {t["key"] for t in primary}
        tasks += primary
    if not args.no_decode:
        tasks += decode_tasks(forms, ints(args.decode_batches), GPU_DEFAULTS["decode_H"] if CUDA
                              else CPU_DEFAULTS["decode_H"], first_cfg[0]["K"], first_cfg[0]["V"], args.decode_dtype)
    if not args.no_sweep:
        tasks += [t for t in everything if t["key"] not in keys]
    rows = run_job("bench", "benchmarks.harness:execute", tasks, config, work, bench_deadline, env=env,
                   task_limit_s=args.task_limit_s)
    ceil = ceilings_of(rows)
    sweep = [r for r in rows if r["kind"] == "sweep"]
    decode = [r for r in rows if r["kind"] == "decode"]
    add_fractions(sweep + decode, ceil)
    for r in decode:  # decode is bandwidth-bound: the state stream against the copy ceiling
        if r.get("status") == "ok" and ceil.get("copy_gbps"):
            r["frac_copy_bw_state"] = r["state_gbps"] / ceil["copy_gbps"]
    doc = dict(schema=1, kind="bench", created=now_iso(), argv=sys.argv[1:], budget_s=args.budget_s,
               config=dict(config, tokens=args.tokens, T=Ts, H=ints(args.H), K=ints(args.K), V=ints(args.V),
                           dtypes=dtypes, modes=strs(args.modes), forms=forms,
                           decode_batches=ints(args.decode_batches), decode_dtype=args.decode_dtype),
               machine=_machine(rows), git=git_info(), source=source_hash(), ceilings=ceil,
               forms=_forms_meta(),
               sweep=[_clean(r) for r in sweep], decode=[_clean(r) for r in decode],
               errors=[_clean(r) for r in rows if r["kind"] in ("machine", "ceiling") and r["status"] != "ok"])
    _dump(os.path.join(out, "bench.json"), doc)
    write_csv(os.path.join(out, "bench.csv"), sweep + decode)
    print(peer_table(sweep), flush=True)
    print(f"\nbench: {sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] == 'skipped' for r in rows)} "
          f"skipped, {sum(r['status'] == 'error' for r in rows)} errors in {time.time() - t_start:.0f} s; "
          f"wrote {out}/bench.json", flush=True)

    if args.accuracy:
        from benchmarks import accuracy
        accuracy.main(["--out", out, "--deadline", str(deadline), "--forms",
                       ",".join(f for f in forms if R.get(f).accuracy), "--seed", str(args.seed)])
    shutil.rmtree(work, ignore_errors=True)
    if args.plots:
        try:
            from benchmarks import plots
            written = plots.write_all(out)
            print(f"plots: {', '.join(os.path.basename(p) for p in written)}")
        except Exception as e:  # plots are a convenience; the data is what counts
            print(f"plots failed: {type(e).__name__}: {e}")
    if args.tar:
        os.makedirs(os.path.dirname(os.path.abspath(args.tar)), exist_ok=True)
        with tarfile.open(args.tar, "w:gz") as tf:
            tf.add(out, arcname=os.path.relpath(out, REPO) if out.startswith(REPO) else os.path.basename(out))
        print(f"packed {out} into {args.tar}")
    print(f"total {time.time() - t_start:.0f} s")
    return 0


def _forms_meta():
    return {f.name: dict(label=f.label, op=f.family, form=f.form, provider=f.provider, flops_model=f.flops_model)
            for f in R.FORMS}


def _machine(rows):
    m = next((r for r in rows if r["kind"] == "machine"), {})
    return {k: v for k, v in m.items() if k not in ("key", "kind", "status", "summary")}


def _clean(r):
    r = {k: v for k, v in r.items() if k not in ("summary", "key")}
    for k, v in list(r.items()):
        if isinstance(v, float) and not math.isfinite(v):
            r[k] = None
    return r


def _dump(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
