"""Properties of the Triton DeltaFormer ops (ops.deltaformer) against the float64 references and torch.

deltaformer_attn = invcum (u = (I + diag(beta) P)^-1 v) then causal softmax attention over u; causal_attention
is also checked alone against torch's scaled_dot_product_attention."""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import ops.deltaformer.attention as attn_mod
import reference
from ops.deltaformer import causal_attention, deltaformer_attn, invcum, invcum_adjoint
from properties.strategies import DEVICE, delta_cases, fixed_case, with_examples
from properties.tolerances import assert_close
from reference.deltaformer import strict_causal_softmax
from reference.segments import segments

GRAD_NAMES = ("q", "k", "v", "beta")
# Rows per block C: T up to 70 on the interpreter spans up to 5 blocks of 16; 64 is the GPU default.
CHUNKS = st.sampled_from([16, 32, 64])




# Edge cases every run sees: one token and head size 1; packed empty and length-1 segments; an empty input;
# K != V and odd sizes over several blocks of 16 with sequences ending inside a block; betas on 0 and 2.
# DeltaFormer carries no state.
df_case = functools.partial(fixed_case, initial_state=False)

EDGE_CASES = [
    df_case(),
    df_case(K=3, V=1, dtype=torch.float64, seqlens=(0, 1, 5, 0)),
    df_case(seqlens=(0, 0), K=8, V=8),
    df_case(B=2, T=40, H=2, K=24, V=3, dtype=torch.float16, unit_keys=False, beta_max=1.0),
    df_case(K=5, V=24, seqlens=(17, 0, 1, 33), beta_ends=True, seed=3, scale=0.5),
]




@contextlib.contextmanager
def _narrow_tiles(enabled):
    """Cap K / V column chunks at 16 so the small interpreter head sizes reach the multi-chunk paths (logits
    summed over K chunks, several V programs in the solves, dP summed over V chunks)."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            mp.setattr(attn_mod, "MAX_TILE", 16)
        yield


def _inputs(case, beta_none=False):
    inp = case.make()
    names = [n for n in GRAD_NAMES if not (n == "beta" and beta_none)]
    ours = {n: inp[n].detach().clone().requires_grad_() for n in names}
    refs = {n: inp[n].detach().double().cpu().requires_grad_() for n in names}
    cu = inp["cu_seqlens"]
    kw = dict(scale=inp["scale"], cu_seqlens=None if cu is None else cu.cpu())
    return ours, refs, kw, inp


def _random_like(x, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64)


def _ref_grads(ro, refs, do):
    if ro.requires_grad:
        return torch.autograd.grad(ro, list(refs.values()), do, allow_unused=True, materialize_grads=True)
    return [torch.zeros_like(x) for x in refs.values()]  # T = 0: a constant empty output


def _solve_matrices(q, k, beta, scale, cu_seqlens):
    """Per (sequence, batch row, start, end): L = I + diag(beta) P as float64 [H, T_n, T_n]."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    out = []
    for _, b, s, e in segments(B, T, cu_seqlens):
        Q, Kt = (x[b, s:e].double().cpu().transpose(0, 1) for x in (q, k))
        bt = beta[b, s:e].double().cpu().T[:, :, None]
        out.append((b, s, e, torch.eye(e - s, dtype=torch.float64) + bt * strict_causal_softmax(Q, Kt, scale)))
    return out


# ---------------------------------------------------------------- DeltaFormer

@given(case=delta_cases(), chunk=CHUNKS, narrow=st.booleans(), beta_none=st.booleans())
@with_examples(EDGE_CASES, chunk=16, narrow=True, beta_none=False)
def test_deltaformer_matches_recurrent_reference(case, chunk, narrow, beta_none, record):
    """o equals the float64 token-by-token reference (deltaformer_recurrent) within the dtype's forward bound for
    every block size (sequences ending mid-block, packed empty and length-1 segments, beta = None meaning ones);
    o comes back in the input dtype and shape."""
    ours, refs, kw, _ = _inputs(case, beta_none)
    with _narrow_tiles(narrow):
        o = deltaformer_attn(**ours, scale=kw["scale"], cu_seqlens=case.cu_seqlens(), chunk_size=chunk)
    ro = reference.deltaformer_recurrent(**refs, **kw)
    assert o.dtype == case.dtype and o.shape == ro.shape
    assert_close("o", o, ro, case.dtype, "forward", record=record)


@given(case=delta_cases(), chunk=CHUNKS, narrow=st.booleans(), beta_none=st.booleans())
@with_examples(EDGE_CASES, chunk=16, narrow=True, beta_none=False)
def test_deltaformer_gradients_match_reference(case, chunk, narrow, beta_none, record):
    """With a random upstream gradient do, the Triton backward's gradients for q, k, v and beta equal the float64
    reference's (deltaformer_solve) autograd gradients within the gradient bound, in the inputs' dtypes."""
    ours, refs, kw, _ = _inputs(case, beta_none)
    with _narrow_tiles(narrow):
        o = deltaformer_attn(**ours, scale=kw["scale"], cu_seqlens=case.cu_seqlens(), chunk_size=chunk)
    ro = reference.deltaformer_solve(**refs, **kw)
    assert_close("o", o, ro, case.dtype, "forward", record=record)
    do = _random_like(o, case.seed + 1).to(device=o.device, dtype=o.dtype)
    with _narrow_tiles(narrow):
        grads = torch.autograd.grad(o, list(ours.values()), do)
    rgrads = _ref_grads(ro, refs, do.double().cpu())
    for name, x, gx, rgx in zip(ours, ours.values(), grads, rgrads):
        assert gx.dtype == x.dtype and gx.shape == x.shape, name
        assert_close(f"d{name}", gx, rgx, case.dtype, "gradient", record=record)


@given(case=delta_cases(), chunk=CHUNKS)
@example(case=EDGE_CASES[4], chunk=16)
def test_deltaformer_with_beta_zero_is_causal_attention(case, chunk, record):
    """With beta = 0 the solve is the identity (u = v): deltaformer_attn equals causal softmax attention (the
    float64 reference), and its gradients for q, k, v equal causal_attention's."""
    ours, refs, kw, inp = _inputs(case)
    cu = case.cu_seqlens()
    zero = torch.zeros_like(inp["beta"])
    o = deltaformer_attn(ours["q"], ours["k"], ours["v"], zero, scale=kw["scale"], cu_seqlens=cu, chunk_size=chunk)
    ro = reference.causal_softmax_attention(refs["q"], refs["k"], refs["v"], **kw)
    assert_close("o", o, ro, case.dtype, "forward", record=record)
    leaves = [ours[n] for n in ("q", "k", "v")]
    do = _random_like(o, case.seed + 2).to(device=o.device, dtype=o.dtype)
    grads = torch.autograd.grad(o, leaves, do)
    ca = causal_attention(*leaves, scale=kw["scale"], cu_seqlens=cu, chunk_size=chunk)
    cgrads = torch.autograd.grad(ca, leaves, do)
    for name, gx, cg in zip("qkv", grads, cgrads):
        assert_close(f"d{name}", gx, cg.double(), case.dtype, "gradient", record=record)


def test_deltaformer_backward_gradcheck():
    """float64 torch.autograd.gradcheck of the Triton backward (q, k, v and beta) on packed sequences of lengths
    0, 1, 19 (two blocks of 16) and 3 with an explicit scale, column chunks of 16 over K = 20 and V = 17."""
    case = df_case(H=2, K=20, V=17, dtype=torch.float64, seqlens=(0, 1, 19, 3), seed=7, scale=0.9)
    inp = case.make()
    leaves = tuple(inp[n].detach().clone().requires_grad_() for n in GRAD_NAMES)

    def f(*xs):
        with _narrow_tiles(True):
            return deltaformer_attn(*xs, scale=0.9, cu_seqlens=inp["cu_seqlens"], chunk_size=16)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@given(name=st.sampled_from(GRAD_NAMES), chunk=CHUNKS)
@example(name="beta", chunk=16)
def test_deltaformer_nan_in_gives_nan_out(name, chunk):
    """A NaN in q, k, v or beta at token t (not a sequence's first) makes o NaN at t."""
    inp = df_case(B=1, T=20, H=2, K=8, V=4, seed=1).make()
    x = inp[name].clone()
    x[0, 17, 1] = float("nan")
    inp[name] = x
    o = deltaformer_attn(inp["q"], inp["k"], inp["v"], inp["beta"], chunk_size=chunk)
    assert torch.isnan(o[0, 17, 1]).all()


def test_deltaformer_bad_input_raises():
    """Wrong shapes, dtypes, devices, head sizes, cu_seqlens, scale or chunk size raise a TypeError or ValueError
    naming the argument (for deltaformer_attn, causal_attention, invcum and invcum_adjoint)."""
    inp = df_case(B=2, T=5, H=2, K=4, V=3).make()
    q, k, v, beta = (inp[n] for n in GRAD_NAMES)
    cu = torch.tensor([0, 2, 5], device=DEVICE)
    f = deltaformer_attn
    bad = [
        (TypeError, "q", lambda: f(q.numpy(), k, v, beta)) if DEVICE == "cpu" else
        (ValueError, "q", lambda: f(q.cpu(), k, v, beta)),
        (ValueError, "k", lambda: f(q, k[:, :4], v, beta)),
        (TypeError, "v", lambda: f(q, k, v.double(), beta)),
        (ValueError, "v", lambda: f(q, k, v[:, :, :1], beta)),
        (TypeError, "beta", lambda: f(q, k, v, beta.half())),
        (ValueError, "beta", lambda: f(q, k, v, beta[..., None])),
        (TypeError, "q", lambda: f(q.int(), k.int(), v.int(), beta.int())),
        (ValueError, "size", lambda: f(q[..., :0], k[..., :0], v, beta)),
        (ValueError, "size", lambda: f(torch.cat([q] * 65, -1), torch.cat([k] * 65, -1), v, beta)),
        (ValueError, "cu_seqlens", lambda: f(q, k, v, beta, cu_seqlens=cu)),
        (ValueError, "cu_seqlens",
         lambda: f(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=torch.tensor([0, 3, 2], device=DEVICE))),
        (TypeError, "cu_seqlens", lambda: f(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=cu.float())),
        (TypeError, "scale", lambda: f(q, k, v, beta, scale="0.5")),
        (ValueError, "chunk_size", lambda: f(q, k, v, beta, chunk_size=24)),
        (ValueError, "k", lambda: causal_attention(q, k[:, :, :1], v)),
        (TypeError, "v", lambda: causal_attention(q, k, v.double())),
        (ValueError, "cu_seqlens", lambda: causal_attention(q, k, v, cu_seqlens=cu)),
        (TypeError, "beta", lambda: invcum(q, k, v, beta.double())),
        (ValueError, "x", lambda: invcum_adjoint(q, k, v[:, :4], beta)),
        (TypeError, "x", lambda: invcum_adjoint(q, k, v.half(), beta)),
        (TypeError, "x", lambda: invcum_adjoint(q, k, [1.0], beta)),
    ]
    for exc, word, call in bad:
        with pytest.raises(exc, match=word):
            call()


def test_deltaformer_empty_input():
    """T = 0 gives an empty o and empty gradients; H = 0 likewise."""
    for shape in ((2, 0, 2), (1, 3, 0)):
        B, T, H = shape
        leaves = [torch.randn(B, T, H, d, device=DEVICE).requires_grad_() for d in (4, 4, 3)]
        beta = torch.rand(B, T, H, device=DEVICE).requires_grad_()
        o = deltaformer_attn(*leaves, beta)
        assert o.shape == (B, T, H, 3)
        grads = torch.autograd.grad(o.sum(), leaves + [beta], allow_unused=True)
        assert all(g is None or g.numel() == 0 for g in grads)


# ---------------------------------------------------------------- the solve alone

@given(case=delta_cases(), chunk=CHUNKS, narrow=st.booleans())
@with_examples(EDGE_CASES, chunk=16, narrow=True)
def test_invcum_matches_triangular_solve(case, chunk, narrow, record):
    """invcum's u solves (I + diag(beta) P) u = v and invcum_adjoint's g solves (I + diag(beta) P)^T g = x:
    both equal torch.linalg.solve_triangular in float64 on the same inputs (within the forward bound); u and g
    come back in the accumulation dtype."""
    _, _, kw, inp = _inputs(case)
    q, k, v, beta = (inp[n] for n in GRAD_NAMES)
    cu = inp["cu_seqlens"]
    x = _random_like(v, case.seed + 3).to(device=v.device, dtype=v.dtype)
    with _narrow_tiles(narrow):
        u = invcum(q, k, v, beta, scale=kw["scale"], cu_seqlens=cu, chunk_size=chunk)
        g = invcum_adjoint(q, k, x, beta, scale=kw["scale"], cu_seqlens=cu, chunk_size=chunk)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert u.dtype == acc and g.dtype == acc and u.shape == v.shape and g.shape == v.shape
    ru = torch.zeros(v.shape, dtype=torch.float64)
    rg = torch.zeros(v.shape, dtype=torch.float64)
    for b, s, e, L in _solve_matrices(q, k, beta, kw["scale"], kw["cu_seqlens"]):
        vs, xs = (y[b, s:e].double().cpu().transpose(0, 1) for y in (v, x))
        ru[b, s:e] = torch.linalg.solve_triangular(L, vs, upper=False, unitriangular=True).transpose(0, 1)
        rg[b, s:e] = torch.linalg.solve_triangular(L.transpose(-1, -2), xs, upper=True,
                                                   unitriangular=True).transpose(0, 1)
    assert_close("u", u, ru, case.dtype, "forward", record=record)
    assert_close("g", g, rg, case.dtype, "forward", record=record)


# ---------------------------------------------------------------- causal attention alone

def _sdpa(q, k, v, scale, cu_seqlens):
    """torch's scaled_dot_product_attention (is_causal) in float64, per packed sequence."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for _, b, s, e in segments(B, T, cu_seqlens):
        if e > s:
            Q, Kt, Vt = (x[b, s:e].transpose(0, 1) for x in (q, k, v))
            o[b, s:e] = F.scaled_dot_product_attention(Q, Kt, Vt, is_causal=True, scale=scale).transpose(0, 1)
    return o


@given(case=delta_cases(), chunk=CHUNKS, narrow=st.booleans())
@with_examples(EDGE_CASES, chunk=16, narrow=True)
def test_causal_attention_matches_sdpa(case, chunk, narrow, record):
    """causal_attention alone equals torch's scaled_dot_product_attention(is_causal=True) in float64 on the same
    rounded inputs, forward (forward bound) and gradients of q, k, v under a random do (gradient bound)."""
    ours, refs, kw, _ = _inputs(case)
    ours.pop("beta")
    refs.pop("beta")
    with _narrow_tiles(narrow):
        o = causal_attention(**ours, scale=kw["scale"], cu_seqlens=case.cu_seqlens(), chunk_size=chunk)
    ro = _sdpa(*refs.values(), **kw)
    assert o.dtype == case.dtype and o.shape == ro.shape
    assert_close("o", o, ro, case.dtype, "forward", record=record)
    do = _random_like(o, case.seed + 4).to(device=o.device, dtype=o.dtype)
    with _narrow_tiles(narrow):
        grads = torch.autograd.grad(o, list(ours.values()), do)
    rgrads = _ref_grads(ro, refs, do.double().cpu())
    for name, x, gx, rgx in zip(ours, ours.values(), grads, rgrads):
        assert gx.dtype == x.dtype and gx.shape == x.shape, name
        assert_close(f"d{name}", gx, rgx, case.dtype, "gradient", record=record)


def test_causal_attention_gradcheck():
    """float64 torch.autograd.gradcheck of causal_attention's Triton backward on packed sequences (0, 1, 19, 3)."""
    case = df_case(H=2, K=20, V=17, dtype=torch.float64, seqlens=(0, 1, 19, 3), seed=5, scale=1.3)
    inp = case.make()
    leaves = tuple(inp[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))

    def f(*xs):
        with _narrow_tiles(True):
            return causal_attention(*xs, scale=1.3, cu_seqlens=inp["cu_seqlens"], chunk_size=16)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
