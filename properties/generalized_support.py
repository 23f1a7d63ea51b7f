"""Shared support for the generalized delta rule (IPLR/DPLR) properties: input families (a, b, gk), the
op-vs-reference check, tile shrinking, gradcheck inputs and malformed inputs."""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ops.common.utils as utils
import ops.generalized_delta_rule.dplr.chunk_A as chunk_A
import ops.generalized_delta_rule.dplr.chunk_h as chunk_h
import ops.generalized_delta_rule.dplr.chunk_o as chunk_o
import ops.generalized_delta_rule.dplr.fused_recurrent as fused_recurrent
import ops.generalized_delta_rule.dplr.wy_fast as wy_fast
from properties.strategies import (
    DEVICE,
    bad_input_maker,
    common_bad_inputs,
    fixed_case,
    log_decay,
    low_rank,
    with_examples,
)
from properties.tolerances import assert_close

GRAD_NAMES = ("q", "k", "v", "a", "b", "gk", "initial_state")
CHUNK_SIZES = (16, 32, 64)
RAW_MAX_T = 24  # raw (unnormalized) a, b are drawn at small T only: their transitions may grow the state


# Edge cases every run sees: one token and head size 1; packed empty and length-1 segments and partial chunks;
# K != V with odd sizes in half precision without initial state.
EDGE_CASES = [
    fixed_case(),
    fixed_case(K=3, V=1, dtype=torch.float64, seqlens=(0, 1, 21, 0, 17)),
    fixed_case(B=2, T=35, H=2, K=24, V=3, dtype=torch.float16, unit_keys=False, initial_state=False),
]


def nonempty(case):
    """The case, or a small one with an empty and a length-1 segment when it has no tokens (T = 0 is checked in
    the empty-input properties; the reference cannot assemble an empty output)."""
    if case.T == 0:
        return dataclasses.replace(case, B=1, T=3, seqlens=(1, 0, 2))
    return case


def inputs(case, family="stable", decay=None, ends=False, gk_dtype=None):
    """The case's q, k, v, initial_state, cu_seqlens, scale plus a, b (and gk = decay * U(0, 1) when decay is
    given, in gk_dtype or the case dtype), on DEVICE."""
    x = case.make()
    x.pop("beta")
    a, b = low_rank(case, family)
    x["a"], x["b"] = (t.to(device=DEVICE, dtype=case.dtype) for t in (a, b))
    if decay is not None:
        x["gk"] = log_decay(case, decay, ends).to(device=DEVICE, dtype=gk_dtype or case.dtype)
    return x


def leaves(x):
    names = [n for n in GRAD_NAMES if x.get(n) is not None]
    ours = {n: x[n].detach().clone().requires_grad_() for n in names}
    refs = {n: x[n].detach().double().requires_grad_() for n in names}
    return ours, refs


def upstream(o, ht, seed):
    """Random upstream gradients for o and (when returned) the final state."""
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    if ht is None:
        return (o,), (do,)
    dht = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(device=ht.device, dtype=ht.dtype)
    return (o, ht), (do, dht)


def check_op(op, ref, x, dtype, record, output_final_state=True, gradients=True):
    """op and the float64 reference on the same inputs: o and the final state within the forward bound (and in
    the right dtypes); with random upstream gradients, every input's gradient within the gradient bound.
    Returns the op's o."""
    ours, refs = leaves(x)
    kw = dict(scale=x["scale"], output_final_state=output_final_state, cu_seqlens=x["cu_seqlens"])
    o, ht = op(**ours, **kw)
    ro, rht = ref(**refs, **kw)
    assert o.dtype == dtype and o.shape == ro.shape
    assert_close("o", o, ro, dtype, "forward", record=record)
    if output_final_state:
        assert ht.dtype == utils.acc_dtype(dtype)
        assert_close("final_state", ht, rht, dtype, "forward", record=record)
    else:
        assert ht is None
    if not gradients:
        return o
    outs, grads_out = upstream(o, ht, 0)
    grads = torch.autograd.grad(outs, list(ours.values()), grads_out)
    routs = (ro, rht) if output_final_state else (ro,)
    rgrads = torch.autograd.grad(routs, list(refs.values()), [g.double() for g in grads_out], allow_unused=True,
                                 materialize_grads=True)
    for name, xx, gx, rgx in zip(ours, ours.values(), grads, rgrads):
        assert gx.dtype == xx.dtype and gx.shape == xx.shape, name
        assert_close(f"d{name}", gx, rgx, dtype, "gradient", record=record)
    return o


@contextlib.contextmanager
def small_tiles(enabled):
    """Lower every tile so the small interpreter head sizes still take the multi-tile paths (several K tiles,
    several V blocks of the state, partial sums over V blocks in the fused recurrent backward)."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            for mod in (chunk_A, wy_fast, chunk_o, chunk_h):
                mp.setattr(mod, "TILE", 16)
            mp.setattr(chunk_A, "FWD_TILE", 16)
            mp.setattr(fused_recurrent, "FWD_TILE", 64)
            mp.setattr(fused_recurrent, "BWD_TILE", 64)
        yield


def with_fields(record, **fields):
    """record, tagging each measurement with extra fields (chunk size, input family, ...)."""
    return lambda name, err, bound, **kw: record(name, err, bound, **fields, **kw)


def chunk_op(chunk_size, fn):
    return lambda **kw: fn(**kw, chunk_size=chunk_size)


def gradcheck_inputs(varlen, decay):
    """Tiny float64 inputs (one packed layout with an empty and a length-1 segment) and cu_seqlens."""
    g = torch.Generator().manual_seed(7)
    if varlen:  # segments of 4, 0 and 1 tokens
        B, T, N, cu = 1, 5, 3, torch.tensor([0, 4, 4, 5], device=DEVICE)
    else:
        B, T, N, cu = 2, 4, 2, None
    H, K, V = 1, 3, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    a = F.normalize(rnd(B, T, H, K), dim=-1)
    b = -1.5 * torch.rand(B, T, H, 1, generator=g, dtype=torch.float64).to(DEVICE) * a + 0.1 * rnd(B, T, H, K)
    args = [rnd(B, T, H, K), rnd(B, T, H, K) / 2, rnd(B, T, H, V), a, b]
    if decay:
        args.append(-torch.rand(B, T, H, K, generator=g, dtype=torch.float64).to(DEVICE) * 2)
    args.append(rnd(N, H, K, V))
    return [x.requires_grad_() for x in args], cu


def gradcheck_fast(form, varlen):
    """The chunk form's full Jacobian takes minutes in the interpreter: it is checked in fast mode (random
    projections u^T J v, numerical against analytical); the fused recurrent form gets the full Jacobian on the
    packed layout (empty and length-1 segments) and fast mode otherwise."""
    return form == "chunk" or not varlen


bad = bad_input_maker(a=lambda B, T, H, K: torch.randn(B, T, H, K), b=lambda B, T, H, K: torch.randn(B, T, H, K))

BAD_INPUTS = [
    (bad(a=torch.randn(1, 6, 2)), "a"),
    (bad(a=torch.randn(1, 6, 2, 5)), "a"),
    (bad(a=torch.randn(1, 6, 2, 4, dtype=torch.float64)), "a"),
    (bad(b=torch.randn(1, 6, 2, 3)), "b"),
    (bad(b=[1.0]), "b"),
    (bad(b=torch.ones(1, 6, 2, 4, dtype=torch.long)), "b"),
    *common_bad_inputs(bad),
    (bad(scale="1"), "scale"),
]


def edge_examples(**extra):
    """@example every EDGE_CASES case with the other arguments fixed to `extra`."""
    return with_examples(EDGE_CASES, **extra)
