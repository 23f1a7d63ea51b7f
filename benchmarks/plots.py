"""Plots of the harness and accuracy data (matplotlib, Agg backend). Each function takes the loaded JSON
(bench.json / accuracy.json as benchmarks/harness.py and benchmarks/accuracy.py write them) and returns PNG
bytes, or None when the data has nothing to plot.

    python3 -m benchmarks.plots reports/data/<gpu>      # writes reports/data/<gpu>/plots/<plot>-<op>.png
"""
from __future__ import annotations

import io
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.registry import BY_NAME, FORMS, OPS, op_subset  # noqa: E402

MODES = ("fwd", "fwd+bwd")
_STYLE = {"ours": "-", "fla": "--", "torch": ":"}
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _label(name, doc=None):
    if doc and name in doc.get("forms", {}):
        return doc["forms"][name].get("label", name)
    return BY_NAME[name].label if name in BY_NAME else name


def _style(name):
    """Same colour for the same form across providers (chunk ours/fla), line style by provider."""
    f = BY_NAME.get(name)
    forms = []
    for g in FORMS:
        if g.form not in forms:
            forms.append(g.form)
    if f is None:
        return dict(color="gray", linestyle="-", marker="o")
    return dict(color=_COLORS[forms.index(f.form) % len(_COLORS)], linestyle=_STYLE.get(f.provider, "-"),
                marker="o" if f.provider == "ours" else ("s" if f.provider == "fla" else "^"))


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ok(rows, **match):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def primary_config(rows):
    """The (dtype, H, K, V) of the first sweep row: the configuration the sweep covers first and fully."""
    for r in rows:
        return dict(dtype=r["dtype"], H=r["H"], K=r["K"], V=r["V"])
    return None


def _forms_in(rows):
    names = []
    for r in rows:
        if r["form"] not in names:
            names.append(r["form"])
    order = [f.name for f in FORMS]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def _per_mode(bench, metric, ylabel, title, scale=1.0, logy=True):
    rows = bench.get("sweep") or []
    cfg = primary_config(rows)
    if cfg is None:
        return None
    rows = _ok(rows, **cfg)
    modes = [m for m in MODES if any(r["mode"] == m and r.get(metric) is not None for r in rows)]
    if not modes:
        return None
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in _forms_in(rows):
            pts = sorted((r["T"], r[metric] * scale) for r in rows
                         if r["form"] == name and r["mode"] == mode and r.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), label=_label(name, bench), **_style(name))
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("T (sequence length; B = tokens / T)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{cfg['dtype']}, H={cfg['H']}, K={cfg['K']}, V={cfg['V']}, "
                 f"{bench.get('config', {}).get('tokens', '?')} tokens per point", fontsize=10)
    return _png(fig)


def throughput_vs_T(bench):
    """Tokens per second vs T per form (log-log), one panel per mode."""
    return _per_mode(bench, "tokens_per_s", "tokens / s", "throughput")


def tflops_vs_T(bench):
    """Model TFLOP/s (benchmarks/flops.py) vs T per form, one panel per mode."""
    return _per_mode(bench, "tflops", "TFLOP/s (model FLOPs)", "compute rate")


def memory_vs_T(bench):
    """Memory one call allocates vs T (max_memory_allocated after a reset, minus what was allocated before the
    call: outputs, saved activations, workspace, gradients; the shared inputs excluded), one panel per mode."""
    return _per_mode(bench, "mem_extra_bytes", "GiB allocated by one call", "memory", scale=2.0 ** -30,
                     logy=False)


def roofline(bench):
    """TFLOP/s vs arithmetic intensity (model FLOPs / minimal bytes) for every sweep point, under the measured
    roofline min(matmul ceiling, intensity x copy bandwidth)."""
    rows = bench.get("sweep") or []
    cfg = primary_config(rows)
    ceil = bench.get("ceilings") or {}
    if cfg is None:
        return None
    rows = [r for r in _ok(rows, **cfg) if r.get("intensity") and r.get("tflops")]
    if not rows:
        return None
    peak = (ceil.get("matmul_tflops") or {}).get(_short(cfg["dtype"]))
    bw = ceil.get("copy_gbps")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [r["intensity"] for r in rows]
    lo, hi = min(xs) / 2, max(xs) * 2
    if peak and bw:
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(peak, x * bw / 1e3) for x in grid], color="black", linewidth=1.5,
                label=f"roofline: {peak:.0f} TFLOP/s {cfg['dtype']} matmul, {bw:.0f} GB/s copy")
        tf32 = (ceil.get("matmul_tflops") or {}).get("tf32")
        if tf32:
            ax.axhline(tf32, color="gray", linestyle=":", linewidth=1, label=f"tf32 matmul {tf32:.0f} TFLOP/s")
    for name in _forms_in(rows):
        for mode, fill in (("fwd", "full"), ("fwd+bwd", "none")):
            pts = [(r["intensity"], r["tflops"]) for r in rows if r["form"] == name and r["mode"] == mode]
            if pts:
                st = _style(name)
                ax.plot(*zip(*pts), linestyle="none", marker=st["marker"], color=st["color"], fillstyle=fill,
                        label=f"{_label(name, bench)} {mode}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (model FLOP / minimal byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("roofline (filled: fwd, open: fwd+bwd; T grows with intensity)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _short(dtype):
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}.get(dtype, dtype)


def decode_bandwidth(bench):
    """Decode (T = 1 per sequence, carried state): state read + write GB/s vs batch, against the copy ceiling."""
    rows = [r for r in (bench.get("decode") or []) if r.get("status") == "ok"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in _forms_in(rows):
        pts = sorted((r["N"], r["state_gbps"]) for r in rows if r["form"] == name)
        ax.plot(*zip(*pts), label=_label(name, bench), **_style(name))
    bw = (bench.get("ceilings") or {}).get("copy_gbps")
    if bw:
        ax.axhline(bw, color="black", linewidth=1, label=f"copy ceiling {bw:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences, one token each)")
    ax.set_ylabel("state GB/s (read + write)")
    r0 = rows[0]
    ax.set_title(f"decode: H={r0['H']}, K={r0['K']}, V={r0['V']}, {r0['dtype']}, fp32 state")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def error_vs_T(acc):
    """Relative error vs T per form: one column per dtype; top row o (and the final state, dotted), bottom row
    the worst gradient; dashed black lines are the bounds of properties/tolerances.py."""
    rows = [r for r in (acc.get("rows") or []) if r.get("status") == "ok"]
    if not rows:
        return None
    dtypes = []
    for r in rows:
        if r["dtype"] not in dtypes:
            dtypes.append(r["dtype"])
    fig, axes = plt.subplots(2, len(dtypes), figsize=(4.2 * len(dtypes), 7), squeeze=False)
    for j, dt in enumerate(dtypes):
        sel = [r for r in rows if r["dtype"] == dt]
        for i, (what, kind) in enumerate((("forward", "bound_forward"), ("gradients", "bound_gradient"))):
            ax = axes[i][j]
            for name in _forms_in(sel):
                rs = sorted((r for r in sel if r["form"] == name), key=lambda r: r["T"])
                st = _style(name)
                if what == "forward":
                    ax.plot([r["T"] for r in rs], [_pos(r["errors"].get("o")) for r in rs],
                            label=f"{_label(name, acc)} o", **st)
                    fs = [(r["T"], _pos(r["errors"]["final_state"])) for r in rs if "final_state" in r["errors"]]
                    if fs:
                        ax.plot(*zip(*fs), color=st["color"], linestyle=":", marker=".", linewidth=1)
                else:
                    ys = [_pos(max((v for k, v in r["errors"].items() if k.startswith("d")), default=None))
                          for r in rs]
                    ax.plot([r["T"] for r in rs], ys, label=_label(name, acc), **st)
            b = sel[0].get(kind)
            if b:
                ax.axhline(b, color="black", linestyle="--", linewidth=1, label="bound")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dt}: {'o (dotted: final state)' if what == 'forward' else 'worst input gradient'}",
                         fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("relative error")
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7)
    return _png(fig)


def _pos(v):
    """Log axes cannot show 0 or inf: 0 -> 1e-20, inf/None -> nan."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return float("nan")
    return max(v, 1e-20)


PLOTS = {"throughput": throughput_vs_T, "tflops": tflops_vs_T, "memory": memory_vs_T, "roofline": roofline,
         "decode": decode_bandwidth}
ACCURACY_PLOTS = {"error_vs_T": error_vs_T}


def write_all(data_dir: str) -> list:
    """Write every plot the folder's bench.json / accuracy.json support to data_dir/plots/<plot>-<op>.png, one per
    op (its forms beside the baselines)."""
    out = os.path.join(data_dir, "plots")
    written = []
    for fname, table, keys, base in (("bench.json", PLOTS, ("sweep", "decode"), True),
                                     ("accuracy.json", ACCURACY_PLOTS, ("rows",), False)):
        path = os.path.join(data_dir, fname)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            doc = json.load(f)
        for op in OPS:
            sub = op_subset(doc, op, keys, base)
            if sub is None:
                continue
            for name, fn in table.items():
                png = fn(sub)
                if png:
                    os.makedirs(out, exist_ok=True)
                    p = os.path.join(out, f"{name}-{op}.png")
                    with open(p, "wb") as f:
                        f.write(png)
                    written.append(p)
    return written


if __name__ == "__main__":
    for d in sys.argv[1:] or ["."]:
        for p in write_all(d):
            print(p)
