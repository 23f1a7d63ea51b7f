"""Properties of the quadratic ("parallel") delta rule (ops.delta_rule.parallel) against the float64 references."""
import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ops.delta_rule.parallel as par
import reference
from ops.delta_rule.parallel import parallel_delta_rule
from properties.strategies import DEVICE, delta_cases, fixed_case
from properties.tolerances import assert_close, bound, rel_err

GRAD_NAMES = ("q", "k", "v", "beta", "initial_state")
# Rows per block C: T up to 70 on the interpreter spans up to 5 blocks of 16; 64 is the GPU default.
CHUNKS = st.sampled_from([16, 32, 64])


# Edge cases every run sees: one token and head size 1; packed empty and length-1 segments; an empty input;
# K != V and odd sizes over several blocks of 16 with sequences ending inside a block; betas on 0 and 2.
EDGE_CASES = [
    fixed_case(),
    fixed_case(K=3, V=1, dtype=torch.float64, seqlens=(0, 1, 5, 0)),
    fixed_case(seqlens=(0, 0), K=8, V=8),
    fixed_case(B=2, T=40, H=2, K=24, V=3, dtype=torch.float16, unit_keys=False, beta_max=1.0, initial_state=False),
    fixed_case(K=5, V=24, seqlens=(17, 0, 1, 33), beta_ends=True, seed=3, scale=0.5),
]


def _edge_examples(**extra):
    def add(test):
        for c in EDGE_CASES:
            test = example(case=c, **extra)(test)
        return test
    return add


@contextlib.contextmanager
def _narrow_tiles(enabled):
    """Cap tiles at 16 columns so K and V span several chunks / programs (partial dbeta sums, V-chunk loops,
    several V blocks in the substitutions), which the small interpreter head sizes would otherwise never reach."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            mp.setattr(par, "MAX_TILE", 16)
        yield


def _run(case, chunk, narrow=False, output_attentions=False):
    """Our op, and leaves for the float64 references (on CPU) holding the same rounded inputs."""
    inp = case.make()
    names = [n for n in GRAD_NAMES if inp.get(n) is not None]
    ours = {n: inp[n].detach().clone().requires_grad_() for n in names}
    refs = {n: inp[n].detach().double().cpu().requires_grad_() for n in names}
    cu = inp["cu_seqlens"]
    with _narrow_tiles(narrow):
        o, attn = parallel_delta_rule(**ours, scale=inp["scale"], output_attentions=output_attentions,
                                      cu_seqlens=cu, chunk_size=chunk)
    kw = dict(scale=inp["scale"], cu_seqlens=None if cu is None else cu.cpu())
    return ours, refs, kw, o, attn


def _block_diagonal(case, attns):
    """The reference's per-sequence A ([H, T_n, T_n] each) placed as [B, H, T, T], zero across sequences."""
    full = torch.zeros(case.B, case.H, case.T, case.T, dtype=torch.float64)
    if case.seqlens is None:
        spans = [(b, 0, case.T) for b in range(case.B)]
    else:
        cu = case.cu_seqlens("cpu").tolist()
        spans = [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    for (b, s, e), a in zip(spans, attns):
        full[b, :, s:e, s:e] = a
    return full


@given(case=delta_cases(), chunk=CHUNKS, narrow=st.booleans())
@_edge_examples(chunk=16, narrow=True)
def test_parallel_matches_recurrent_reference(case, chunk, narrow, record):
    """o equals the float64 token-by-token reference within the dtype's forward bound, for every block size C
    (sequences ending mid-block, packed empty and length-1 segments); o comes back in the input dtype and
    attn is None unless asked for."""
    _, refs, kw, o, attn = _run(case, chunk, narrow)
    ro, _ = reference.delta_rule_recurrent(**refs, **kw)
    assert attn is None
    assert o.dtype == case.dtype and o.shape == ro.shape
    assert_close("o", o, ro, case.dtype, "forward", record=record)


@given(case=delta_cases(), chunk=CHUNKS)
@_edge_examples(chunk=16)
def test_parallel_attention_matches_reference(case, chunk, record):
    """attn ([B, H, T, T], input dtype, no grad) equals the reference's A = scale (Q K^T * M) L^-1 diag(beta),
    block diagonal over packed sequences (zero across them and above the diagonal), and reproduces the output:
    o = attn (V - K S0) + scale Q S0 (to the forward bound times the sum's cancellation factor)."""
    ours, refs, kw, o, attn = _run(case, chunk, output_attentions=True)
    _, _, ra = reference.delta_rule_parallel(**refs, **kw)
    expected = _block_diagonal(case, ra)
    assert attn.shape == expected.shape and attn.dtype == case.dtype and not attn.requires_grad
    assert_close("attn", attn, expected, case.dtype, "forward", record=record)
    x = {n: t.detach().double().cpu() for n, t in ours.items()}
    scale = kw["scale"] if kw["scale"] is not None else case.K ** -0.5
    s0 = x.get("initial_state")
    if s0 is None:
        qs0, vk = 0.0, x["v"]
    else:  # per token the state of its sequence: S0[n(t)]
        seq = torch.arange(case.B)[:, None].expand(case.B, case.T) if case.seqlens is None else \
            torch.repeat_interleave(torch.arange(len(case.seqlens)), torch.tensor(case.seqlens))[None]
        st0 = s0[seq]  # [B, T, H, K, V]
        qs0 = scale * torch.einsum("bthk,bthkv->bthv", x["q"], st0)
        vk = x["v"] - torch.einsum("bthk,bthkv->bthv", x["k"], st0)
    a = attn.double().cpu()
    recon = torch.einsum("bhts,bshv->bthv", a, vk) + qs0
    # attn and o are each rounded to the dtype, so their identity holds to the forward bound times the
    # cancellation in the sum: kappa = || |attn| |V - K S0| + |scale Q S0| || / ||o|| (>= 1).
    magnitude = torch.einsum("bhts,bshv->bthv", a.abs(), vk.abs()) + torch.as_tensor(qs0).abs()
    kappa = max(1.0, magnitude.norm().item() / recon.norm().item()) if recon.norm() > 0 else 1.0
    err, b = rel_err(o, recon), bound(case.dtype, "forward") * kappa
    record("o_from_attn", err, b, kappa=kappa)
    assert err <= b, f"o_from_attn: relative error {err:.3e} > bound {b:.3e} (kappa {kappa:.1f}, {case.dtype})"


@given(case=delta_cases(), chunk=CHUNKS, narrow=st.booleans())
@_edge_examples(chunk=16, narrow=True)
def test_parallel_gradients_match_reference(case, chunk, narrow, record):
    """With a random upstream gradient do, the Triton backward's gradients for q, k, v, beta and initial_state
    equal the float64 reference's autograd gradients within the gradient bound, in the inputs' dtypes."""
    ours, refs, kw, o, _ = _run(case, chunk, narrow)
    ro, _ = reference.delta_rule_recurrent(**refs, **kw)
    assert_close("o", o, ro, case.dtype, "forward", record=record)
    g = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    with _narrow_tiles(narrow):
        grads = torch.autograd.grad(o, list(ours.values()), do.to(device=o.device, dtype=o.dtype))
    if ro.requires_grad:
        rgrads = torch.autograd.grad(ro, list(refs.values()), do.to(o.dtype).double(), allow_unused=True,
                                     materialize_grads=True)
    else:  # T = 0: the reference's o is a constant empty tensor; every gradient is zero
        rgrads = [torch.zeros_like(x) for x in refs.values()]
    for name, x, gx, rgx in zip(ours, ours.values(), grads, rgrads):
        assert gx.dtype == x.dtype and gx.shape == x.shape, name
        assert_close(f"d{name}", gx, rgx, case.dtype, "gradient", record=record)


@pytest.mark.parametrize("narrow", [False, True])
def test_parallel_backward_gradcheck(narrow):
    """float64 torch.autograd.gradcheck of the Triton backward (q, k, v, beta and initial_state) on packed
    sequences of lengths 0, 1, 19 (two blocks of 16) and 3, with an explicit scale."""
    case = fixed_case(H=2, K=3, V=2, dtype=torch.float64, seqlens=(0, 1, 19, 3), seed=7, scale=0.9)
    inp = case.make()
    names = list(GRAD_NAMES)
    leaves = tuple(inp[n].detach().clone().requires_grad_() for n in names)

    def f(*xs):
        with _narrow_tiles(narrow):
            return parallel_delta_rule(*xs[:4], scale=0.9, initial_state=xs[4], cu_seqlens=inp["cu_seqlens"],
                                       chunk_size=16)[0]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@given(name=st.sampled_from(GRAD_NAMES), chunk=CHUNKS)
@example(name="initial_state", chunk=16)
def test_parallel_nan_in_gives_nan_out(name, chunk):
    """A NaN in q, k, v or beta at token t makes o NaN at t; a NaN in the initial state makes o NaN."""
    case = fixed_case(B=1, T=20, H=2, K=8, V=4, seed=1)
    inp = case.make()
    x = inp[name].clone()
    if name == "initial_state":
        x[0, 1, 2, 3] = float("nan")
    else:
        x[0, 17, 1] = float("nan")
    inp[name] = x
    o, _ = parallel_delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], initial_state=inp["initial_state"],
                               chunk_size=chunk)
    assert torch.isnan(o[0, 17, 1]).any() if name != "initial_state" else torch.isnan(o).any()


def test_parallel_bad_input_raises():
    """Wrong shapes, dtypes, devices, head sizes, cu_seqlens, initial state or chunk size raise a TypeError or
    ValueError naming the argument."""
    inp = fixed_case(B=2, T=5, H=2, K=4, V=3).make()
    q, k, v, beta, s0 = (inp[n] for n in GRAD_NAMES)
    cu = torch.tensor([0, 2, 5], device=DEVICE)
    bad = [
        (TypeError, "q", lambda: parallel_delta_rule(q.detach().cpu().numpy(), k, v, beta)),
        (ValueError, "k", lambda: parallel_delta_rule(q, k[:, :4], v, beta)),
        (TypeError, "v", lambda: parallel_delta_rule(q, k, v.double(), beta)),
        (ValueError, "v", lambda: parallel_delta_rule(q, k, v[:, :, :1], beta)),
        (TypeError, "beta", lambda: parallel_delta_rule(q, k, v, beta.half())),
        (ValueError, "beta", lambda: parallel_delta_rule(q, k, v, beta[..., None])),
        (TypeError, "q", lambda: parallel_delta_rule(q.int(), k.int(), v.int(), beta.int())),
        (ValueError, "size", lambda: parallel_delta_rule(q[..., :0], k[..., :0], v, beta)),
        (ValueError, "size", lambda: parallel_delta_rule(torch.cat([q] * 65, -1), torch.cat([k] * 65, -1), v, beta)),
        (ValueError, "initial_state", lambda: parallel_delta_rule(q, k, v, beta, initial_state=s0[:1])),
        (ValueError, "cu_seqlens", lambda: parallel_delta_rule(q, k, v, beta, cu_seqlens=cu)),
        (ValueError, "cu_seqlens",
         lambda: parallel_delta_rule(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=torch.tensor([0, 3, 2], device=DEVICE))),
        (TypeError, "cu_seqlens",
         lambda: parallel_delta_rule(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=cu.float())),
        (TypeError, "scale", lambda: parallel_delta_rule(q, k, v, beta, scale="0.5")),
        (ValueError, "chunk_size", lambda: parallel_delta_rule(q, k, v, beta, chunk_size=24)),
    ]
    if DEVICE == "cuda":  # a CPU tensor among CUDA ones (on the CPU everything is on the CPU already)
        bad.append((ValueError, "q", lambda: parallel_delta_rule(q.cpu(), k, v, beta)))
    for exc, word, call in bad:
        with pytest.raises(exc, match=word):
            call()


def test_parallel_empty_input():
    """T = 0 gives an empty o (and attn), zero beta-shaped gradients and a zero initial-state gradient."""
    case = fixed_case(B=2, T=0, H=2, K=4, V=3)
    inp = case.make()
    leaves = [inp[n].detach().clone().requires_grad_() for n in GRAD_NAMES]
    o, attn = parallel_delta_rule(*leaves[:4], initial_state=leaves[4], output_attentions=True)
    assert o.shape == (2, 0, 2, 3) and attn.shape == (2, 2, 0, 0)
    grads = torch.autograd.grad(o.sum(), leaves, allow_unused=True)
    assert grads[4] is not None and torch.equal(grads[4], torch.zeros_like(leaves[4]))
