"""Which kernel of the delta rule's chunk form errs: each stage against float64 math on the inputs it received.

    python3 -m benchmarks.diagnose_stages --lens 0,67,49 --H 2 --K 128 --V 32 --dtype bf16 [--variant w4s3]
        [--json FILE]

For a failure the whole-op tests see but cannot place (e.g. one that only the GPU shows): the forward and
backward stages of ops/delta_rule/chunk.py run one by one on one packed batch, and each stage's outputs are held
against the same stage computed in float64 from the inputs that kernel received (the upstream kernels' actual
outputs, upcast), so an error shows in the stage that makes it, not in the stages downstream of it. Per stage and
output: ||x - x64|| / ||x64|| over the batch and over its worst sequence. The float64 stage math is the one in the
modules' docstrings (wy_fast, chunk_h, chunk_o), the WY stage reference.delta_rule's; wy_bwd is checked as its
vector-Jacobian product.
"""
import argparse
import json
import re
import sys

import torch

import ops.common.utils as U
from ops.delta_rule.chunk import backward_storage
from ops.delta_rule.chunk_h import chunk_h_bwd, chunk_h_fwd
from ops.delta_rule.chunk_o import chunk_dv_local, chunk_o_bwd, chunk_o_fwd
from ops.delta_rule.wy_fast import wy_bwd, wy_fwd
from properties.tolerances import rel_err
from reference.delta_rule import wy_representation
from reference.segments import segments

DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32, fp64=torch.float64)


def _chunks(bounds, C):
    """(sequence n, global chunk index, first row, last row + 1) of every chunk, in the kernels' order."""
    c = 0
    for n, _, s, e in segments(1, bounds[-1], torch.tensor(bounds)):
        for r0 in range(s, e, C):
            yield n, c, r0, min(r0 + C, e)
            c += 1


def wy64(k, v, beta, bounds, C):
    """W, U ([T, H, K], [T, H, V]) of the packed rows, per chunk: reference.delta_rule.wy_representation."""
    W, Uu = [], []
    for _, _, r0, r1 in _chunks(bounds, C):
        w, u, _ = wy_representation(k[r0:r1].transpose(0, 1), v[r0:r1].transpose(0, 1), beta[r0:r1].T)
        W.append(w.transpose(0, 1))
        Uu.append(u.transpose(0, 1))
    return (torch.cat(W), torch.cat(Uu)) if W else (torch.zeros_like(k), torch.zeros_like(v))


def h64(k, w, u, s0, bounds, C):
    """h (state entering each chunk, [NC, H, K, V]), v_new = U - W h and the final states [N, H, K, V]."""
    H, K, V = k.shape[1], k.shape[2], u.shape[2]
    N = len(bounds) - 1
    hs, v_new = [], torch.zeros_like(u)
    final = s0.clone() if s0 is not None else torch.zeros(N, H, K, V, dtype=k.dtype)
    for n, _, r0, r1 in _chunks(bounds, C):
        S = final[n]
        hs.append(S.clone())
        vn = u[r0:r1] - torch.einsum("thk,hkv->thv", w[r0:r1], S)
        v_new[r0:r1] = vn
        final[n] = S + torch.einsum("thk,thv->hkv", k[r0:r1], vn)
    return torch.stack(hs) if hs else torch.zeros(0, H, K, V, dtype=k.dtype), v_new, final


def _attn(a, b, r):
    """(a b^T * M) per head over rows r (M: the inclusive causal mask), [H, c, c]."""
    return torch.tril(torch.einsum("thk,shk->hts", a[r], b[r]))


def o64(q, k, v_new, h, scale, bounds, C):
    """O = scale (Q h_n + (Q K^T * M) v_new) per chunk."""
    o = torch.zeros_like(v_new)
    for _, c, r0, r1 in _chunks(bounds, C):
        r = slice(r0, r1)
        o[r] = scale * (torch.einsum("thk,hkv->thv", q[r], h[c])
                        + torch.einsum("hts,shv->thv", _attn(q, k, r), v_new[r]))
    return o


def h_bwd64(q, k, w, do, dv_local, dht, scale, bounds, C, nc):
    """dh (gradient of the state leaving each chunk), dv_new = dv_local + K dh, dS0, in reverse over chunks."""
    H, K, V = k.shape[1], k.shape[2], do.shape[2]
    N = len(bounds) - 1
    dh = torch.zeros(nc, H, K, V, dtype=k.dtype)
    dv_new = torch.zeros_like(do)
    dS = dht.clone() if dht is not None else torch.zeros(N, H, K, V, dtype=k.dtype)
    for n, c, r0, r1 in reversed(list(_chunks(bounds, C))):
        r = slice(r0, r1)
        dh[c] = dS[n]
        dv_new[r] = dv_local[r] + torch.einsum("thk,hkv->thv", k[r], dS[n])
        dS[n] = (dS[n] + scale * torch.einsum("thk,thv->hkv", q[r], do[r])
                 - torch.einsum("thk,thv->hkv", w[r], dv_new[r]))
    return dh, dv_new, dS


def o_bwd64(q, k, v_new, h, do, dh, dv_new, scale, bounds, C):
    """dQ = scale dO h^T + scale (dO v_new^T * M) K,  dK = scale (dO v_new^T * M)^T Q + v_new dh^T,
    dW = -dv_new h^T (per chunk)."""
    dq, dk, dw = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(k)
    for _, c, r0, r1 in _chunks(bounds, C):
        r = slice(r0, r1)
        P = _attn(do, v_new, r)
        dq[r] = scale * (torch.einsum("thv,hkv->thk", do[r], h[c]) + torch.einsum("hts,shk->thk", P, k[r]))
        dk[r] = scale * torch.einsum("hts,thk->shk", P, q[r]) + torch.einsum("thv,hkv->thk", v_new[r], dh[c])
        dw[r] = -torch.einsum("thv,hkv->thk", dv_new[r], h[c])
    return dq, dk, dw


def dv_local64(q, k, do, scale, bounds, C):
    dv = torch.zeros_like(do)
    for _, _, r0, r1 in _chunks(bounds, C):
        r = slice(r0, r1)
        dv[r] = scale * torch.einsum("hts,thv->shv", _attn(q, k, r), do[r])
    return dv


def _errors(name, x, ref, bounds, out):
    """rel_err over the whole tensor, and over the worst sequence of a per-token tensor [T, H(, D)]."""
    x, ref = x.double().cpu(), ref.double().cpu()
    total = rel_err(x, ref)
    worst = total
    if x.dim() in (2, 3):
        worst = max((rel_err(x[s:e], ref[s:e]) for s, e in zip(bounds[:-1], bounds[1:]) if e > s), default=0.0)
    out.append(dict(stage=name[0], output=name[1], err=total, worst_sequence=worst,
                    operands=str(U.LAST_OPERANDS.get(name[0], ("acc",))[0])))


def diagnose(lens, H, K, V, dtype, chunk_size=64, seed=0, initial_state=True, device=None):
    """Run every stage of the chunk form once; return [{stage, output, err, worst_sequence}]."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    T, N = sum(lens), len(lens)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = mk(1, T, H, K), torch.nn.functional.normalize(mk(1, T, H, K), dim=-1), mk(1, T, H, V)
    beta = torch.rand(1, T, H, generator=g, dtype=torch.float64)
    s0 = mk(N, H, K, V) if initial_state else None
    do, dht = mk(1, T, H, V), mk(N, H, K, V)
    dev = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    qd, kd, vd, bd, dod = (dev(x) for x in (q, k, v, beta, do))
    acc = U.acc_dtype(dtype)
    s0d = None if s0 is None else s0.to(acc).to(device)
    dhtd = dht.to(acc).to(device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    scale = K ** -0.5
    up = lambda x: x.double().cpu()[0]  # noqa: E731  (a per-token tensor [1, T, ...] as [T, ...] in float64)
    st = lambda x: x.double().cpu()  # noqa: E731  (a state tensor [NC or N, H, K, V])
    # the same rounded inputs in float64
    q64, k64, v64, b64, do64 = (up(x) for x in (qd, kd, vd, bd, dod))
    out = []
    U.LAST_OPERANDS.clear()
    with U.on_device(qd.device):
        offsets, cmap, chunk_offsets, NC = U.chunk_index(cu, 1, T, chunk_size, qd.device)
        scale_t = U.scale_arg(scale, dtype, qd.device)
        w, u, x = wy_fwd(kd, vd, bd, offsets, cmap, chunk_size)
        W64, U64 = wy64(k64, v64, b64, bounds, chunk_size)
        _errors(("wy_fwd", "w"), up(w), W64, bounds, out)
        _errors(("wy_fwd", "u"), up(u), U64, bounds, out)
        h, v_new, ht, _ = chunk_h_fwd(kd, w, u, s0d, True, offsets, chunk_offsets, NC, chunk_size)
        rh, rv, rt = h64(k64, up(w), up(u), None if s0d is None else st(s0d), bounds, chunk_size)
        _errors(("chunk_h_fwd", "h"), st(h), rh, bounds, out)
        _errors(("chunk_h_fwd", "v_new"), up(v_new), rv, bounds, out)
        _errors(("chunk_h_fwd", "final_state"), st(ht), rt, bounds, out)
        o = chunk_o_fwd(qd, kd, v_new, h, scale_t, offsets, cmap, chunk_size)
        _errors(("chunk_o_fwd", "o"), up(o), o64(q64, k64, up(v_new), st(h), scale, bounds, chunk_size),
                bounds, out)
        dv_local = chunk_dv_local(qd, kd, dod, scale_t, offsets, cmap, chunk_size)
        _errors(("chunk_dv_local", "dv_local"), up(dv_local), dv_local64(q64, k64, do64, scale, bounds, chunk_size),
                bounds, out)
        dv_new_dtype, dw_dtype = backward_storage(dtype, chunk_size, K, V)  # as the op stores them
        dh, dv_new, ds0 = chunk_h_bwd(qd, kd, w, dod, dv_local, dhtd, s0d, scale_t, offsets, chunk_offsets, NC,
                                      chunk_size, dv_new_dtype=dv_new_dtype)
        rdh, rdv, rds0 = h_bwd64(q64, k64, up(w), do64, up(dv_local), st(dhtd), scale, bounds, chunk_size,
                                 NC)
        _errors(("chunk_h_bwd", "dh"), st(dh), rdh, bounds, out)
        _errors(("chunk_h_bwd", "dv_new"), up(dv_new), rdv, bounds, out)
        if ds0 is not None:
            _errors(("chunk_h_bwd", "ds0"), st(ds0), rds0, bounds, out)
        dq, dk_part, dw = chunk_o_bwd(qd, kd, v_new, h, dod, dh, dv_new, scale_t, offsets, cmap, chunk_size,
                                      dw_dtype=dw_dtype)
        rq, rk, rw = o_bwd64(q64, k64, up(v_new), st(h), do64, st(dh), up(dv_new), scale,
                             bounds, chunk_size)
        for nm, a, b in (("dq", dq, rq), ("dk_part", dk_part, rk), ("dw", dw, rw)):
            _errors(("chunk_o_bwd", nm), up(a), b, bounds, out)
        dk, dv, dbeta = wy_bwd(kd, vd, bd, x, dw, dv_new, dk_part, offsets, cmap, chunk_size)
        leaves = [t.clone().requires_grad_() for t in (k64, v64, b64)]
        Wl, Ul = wy64(*leaves, bounds, chunk_size)
        gk, gv, gb = torch.autograd.grad((Wl, Ul), leaves, (up(dw), up(dv_new)))
        for nm, a, b in (("dk", dk, gk + up(dk_part)), ("dv", dv, gv), ("dbeta", dbeta, gb)):
            _errors(("wy_bwd", nm), up(a), b, bounds, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.diagnose_stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--lens", default="0,67,49", help="sequence lengths of the packed batch")
    p.add_argument("--H", type=int, default=2)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--variant", default=None,
                   help="launch every kernel at these settings instead (tune_launch's labels, e.g. w4s3)")
    a = p.parse_args(argv)
    if a.variant:
        m = re.fullmatch(r"w(\d+)s(\d+)", a.variant)
        if not m:
            p.error(f"--variant must look like w4s3 (num_warps 4, num_stages 3), got {a.variant!r}")
        U.OVERRIDE.update(num_warps=int(m[1]), num_stages=int(m[2]))
    lens = [int(x) for x in a.lens.split(",")]
    rows = diagnose(lens, a.H, a.K, a.V, DTYPES[a.dtype], a.chunk, a.seed)
    half = sorted(U.HALF_OPERANDS)
    print(f"lens={lens} H={a.H} K={a.K} V={a.V} {a.dtype} C={a.chunk} half operands in {half or 'none'}"
          f"{', launches ' + a.variant if a.variant else ''}: "
          "stage error vs float64 on its own inputs")
    for r in rows:
        print(f"  {r['stage']:15s} {r['output']:12s} {r['operands']:5s} {r['err']:.2e}   "
              f"worst sequence {r['worst_sequence']:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(lens=lens, H=a.H, K=a.K, V=a.V, dtype=a.dtype, chunk=a.chunk, half_operands=half,
                           variant=a.variant,
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
