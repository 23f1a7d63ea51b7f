"""Properties of the chunkwise delta rule (ops.delta_rule.chunk) against the float64 token-by-token reference."""
import contextlib
import dataclasses

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ops.common.utils as U
import ops.delta_rule.chunk_h as chunk_h
import ops.delta_rule.chunk_o as chunk_o
import ops.delta_rule.wy_fast as wy_fast
import reference
from ops.delta_rule.chunk import chunk_delta_rule
from properties.strategies import DEVICE, ON_GPU, OP_DTYPES, delta_cases, fixed_case, with_examples
from properties.tolerances import assert_close

GRAD_NAMES = ("q", "k", "v", "beta", "initial_state")
CHUNK_SIZES = (16, 32, 64)




# Edge cases every run sees: one token and head size 1; packed empty and length-1 segments and partial chunks;
# K != V, odd sizes, half precision without initial state; nothing but empty segments.
EDGE_CASES = [
    fixed_case(),
    fixed_case(K=3, V=1, dtype=torch.float64, seqlens=(0, 1, 21, 0, 16)),
    fixed_case(B=2, T=35, H=2, K=24, V=3, dtype=torch.float16, unit_keys=False, beta_max=1.0, initial_state=False),
    fixed_case(seqlens=(0, 0), K=8, V=8),
]




@contextlib.contextmanager
def _small_tiles(enabled):
    """Lower every K/V tile to 16 so that the small interpreter head sizes still go through the multi-tile
    paths (several K tiles of the state, several V blocks, K/V loops)."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            for mod in (chunk_h, chunk_o, wy_fast):
                mp.setattr(mod, "TILE", 16)
        yield


def _run(case, chunk_size, *, output_final_state=True, l2norm=False, small_tiles=False, inp=None):
    """Our op and the float64 reference on the same (rounded) inputs; leaves for both, for gradients."""
    inp = inp or case.make()
    names = [n for n in GRAD_NAMES if inp.get(n) is not None]
    ours = {n: inp[n].detach().clone().requires_grad_() for n in names}
    refs = {n: inp[n].detach().double().requires_grad_() for n in names}
    kw = dict(scale=inp["scale"], output_final_state=output_final_state, cu_seqlens=inp["cu_seqlens"])
    with _small_tiles(small_tiles):
        o, ht = chunk_delta_rule(**ours, use_qk_l2norm_in_kernel=l2norm, chunk_size=chunk_size, **kw)
    rin = dict(refs)
    if l2norm:
        rin["q"], rin["k"] = reference.l2norm(rin["q"]), reference.l2norm(rin["k"])
    ro, rht = reference.delta_rule_recurrent(**rin, **kw)
    return ours, refs, (o, ht), (ro, rht)


def _with(record, **fields):
    """record, tagging each measurement with extra fields (chunk size)."""
    return lambda name, err, bound, **kw: record(name, err, bound, **fields, **kw)


def _upstream(case, o, ht):
    g = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    dht = None if ht is None else \
        torch.randn(ht.shape, generator=g, dtype=torch.float64).to(device=ht.device, dtype=ht.dtype)
    return do, dht


def _grads(outs, leaves, do, dht, small_tiles=False):
    o, ht = outs
    pairs = [(x, g) for x, g in [(o, do), (ht, dht)] if x is not None and x.requires_grad]
    if not pairs:  # (the reference's outputs for T = 0 are constants)
        return [torch.zeros_like(x) for x in leaves]
    with _small_tiles(small_tiles):
        return torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True,
                                   materialize_grads=True)


def _check_gradients(case, chunk_size, ours, refs, outs, routs, record, small_tiles=False, tag=""):
    do, dht = _upstream(case, *outs)
    grads = _grads(outs, list(ours.values()), do, dht, small_tiles)
    rgrads = _grads(routs, list(refs.values()), do.double(), None if dht is None else dht.double())
    for name, g, rg in zip(ours, grads, rgrads):
        assert g.dtype == ours[name].dtype and g.shape == ours[name].shape
        assert_close(f"d{name}{tag}", g, rg, case.dtype, "gradient", record=_with(record, chunk_size=chunk_size))


@given(case=delta_cases(), chunk_size=st.sampled_from(CHUNK_SIZES), small_tiles=st.booleans())
@with_examples(EDGE_CASES, chunk_size=16, small_tiles=False)
@example(case=fixed_case(B=2, T=40, H=2, K=24, V=20, seqlens=None), chunk_size=16, small_tiles=True)
def test_chunk_matches_recurrent_reference(case, chunk_size, small_tiles, record):
    """o and the final state equal the float64 token-by-token recurrence within the dtype's forward bound,
    for every chunk size, in the documented dtypes (o: input dtype; final state: float32, float64 for float64)."""
    _, _, (o, ht), (ro, rht) = _run(case, chunk_size, small_tiles=small_tiles)
    assert o.dtype == case.dtype and o.shape == ro.shape
    assert ht.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    assert_close("o", o, ro, case.dtype, record=_with(record, chunk_size=chunk_size))
    assert_close("final_state", ht, rht, case.dtype, record=_with(record, chunk_size=chunk_size))


@given(case=delta_cases(), chunk_size=st.sampled_from(CHUNK_SIZES), output_final_state=st.booleans(),
       small_tiles=st.booleans())
@with_examples(EDGE_CASES, chunk_size=16, output_final_state=True, small_tiles=False)
@example(case=fixed_case(B=1, T=50, H=2, K=60, V=40, dtype=torch.float64), chunk_size=16, output_final_state=True,
         small_tiles=True)
@example(case=fixed_case(seqlens=(0, 1, 19, 0), H=2, K=5, V=7, dtype=torch.float64), chunk_size=16,
         output_final_state=False, small_tiles=False)
# Drawn on the GPU (visit 13): at K = 1 the initial state's gradient is a small difference of large products, and
# fp16 inputs' float32 products at tf32 (operands truncated to 10 bits) erred 3.7x the bound; ieee now.
@example(case=fixed_case(T=83, H=2, K=1, V=256, dtype=torch.float16, seed=2985, beta_ends=True, seqlens=(82, 1)),
         chunk_size=64, output_final_state=True, small_tiles=True)
def test_chunk_gradients_match_reference(case, chunk_size, output_final_state, small_tiles, record):
    """Every input gradient (q, k, v, beta, initial_state) for random upstream gradients of o and of the final
    state equals the float64 reference gradient within the dtype's gradient bound."""
    ours, refs, outs, routs = _run(case, chunk_size, output_final_state=output_final_state,
                                   small_tiles=small_tiles)
    assert (outs[1] is None) == (not output_final_state)
    _check_gradients(case, chunk_size, ours, refs, outs, routs, record, small_tiles)


@given(case=delta_cases(), chunk_size=st.sampled_from(CHUNK_SIZES), small_tiles=st.booleans(),
       dot_first=st.booleans())
@example(case=fixed_case(B=1, T=50, H=2, K=40, V=24, dtype=torch.float32), chunk_size=16, small_tiles=True,
         dot_first=True)
@example(case=fixed_case(B=1, T=50, H=2, K=40, V=24, dtype=torch.float32), chunk_size=16, small_tiles=True,
         dot_first=False)
def test_state_pass_in_either_order_matches_reference(case, chunk_size, small_tiles, dot_first, record,
                                                      monkeypatch):
    """With the state passes' W h and K dh summed before U and dv_local are added (utils.STATE_DOT_FIRST, the
    default) or after, o, the final state and every gradient equal the float64 reference within the dtype's
    bounds (several K tiles of the state with small_tiles)."""
    monkeypatch.setattr(U, "STATE_DOT_FIRST", dot_first)
    tag = " [dot first]" if dot_first else " [loaded term first]"
    ours, refs, outs, routs = _run(case, chunk_size, small_tiles=small_tiles)
    assert_close("o" + tag, outs[0], routs[0], case.dtype, record=_with(record, chunk_size=chunk_size))
    assert_close("final_state" + tag, outs[1], routs[1], case.dtype, record=_with(record, chunk_size=chunk_size))
    _check_gradients(case, chunk_size, ours, refs, outs, routs, record, small_tiles, tag=tag)


@given(case=delta_cases(), chunk_size=st.sampled_from(CHUNK_SIZES), small_tiles=st.booleans(),
       fused=st.booleans(), fills_gpu=st.booleans())
@example(case=fixed_case(B=1, T=50, H=2, K=40, V=24, dtype=torch.float32), chunk_size=16, small_tiles=True,
         fused=True, fills_gpu=True)
@example(case=fixed_case(seqlens=(0, 1, 19, 0), H=2, K=5, V=7, dtype=torch.float64), chunk_size=16,
         small_tiles=False, fused=True, fills_gpu=True)
@example(case=fixed_case(seqlens=(0, 67, 49), H=2, K=64, V=64, dtype=torch.bfloat16 if ON_GPU else torch.float16),
         chunk_size=64, small_tiles=False, fused=True, fills_gpu=False)
def test_output_and_dv_local_in_the_state_pass_match_reference(case, chunk_size, small_tiles, fused, fills_gpu,
                                                                record, monkeypatch):
    """With o computed inside the forward state pass and dv_local inside the backward one (utils.FUSED_STATE) or
    by their own kernels, and with the state passes' grid filling the GPU or not (fewer programs than SMs: o by
    chunk_o_fwd, V split in 32-wide blocks in the forward pass, two pipeline stages in the backward one), o, the
    final state and every gradient equal the float64 reference within the dtype's bounds (several K tiles and V
    blocks with small_tiles). chunk_o_fwd runs exactly where the forward pass does not form o, chunk_dv_local
    exactly where the backward pass does not form dv_local."""
    monkeypatch.setattr(U, "FUSED_STATE", fused)
    monkeypatch.setattr(chunk_h, "few_programs", lambda n, device: not fills_gpu)
    U.LAST_OPERANDS.clear()
    tag = (" [fused state pass" if fused else " [separate o, dv_local") + ("]" if fills_gpu else ", few programs]")
    ours, refs, outs, routs = _run(case, chunk_size, small_tiles=small_tiles)
    assert_close("o" + tag, outs[0], routs[0], case.dtype, record=_with(record, chunk_size=chunk_size))
    assert_close("final_state" + tag, outs[1], routs[1], case.dtype, record=_with(record, chunk_size=chunk_size))
    _check_gradients(case, chunk_size, ours, refs, outs, routs, record, small_tiles, tag=tag)
    if case.T:
        assert ("chunk_o_fwd" in U.LAST_OPERANDS) == (not (fused and fills_gpu))
        assert ("chunk_dv_local" in U.LAST_OPERANDS) == (not fused)
        with _small_tiles(small_tiles):
            split = not fills_gpu and U.STATE_SPLIT_V and chunk_h._blocks(case.K, case.V)[2] == 64
        assert (len(U.LAST_OPERANDS["chunk_h_fwd"][1]) == 2) == split  # (split: tiles C, BK; else C, BK, BV)


HALF_DTYPES = [d for d in OP_DTYPES if d in (torch.float16, torch.bfloat16)]


@given(case=delta_cases(head_sizes=[3, 17, 32, 64]),
       chunk_size=st.sampled_from(CHUNK_SIZES), qt_ds=st.booleans())
@example(case=fixed_case(B=1, T=150, H=2, K=64, V=64, dtype=torch.float16), chunk_size=64, qt_ds=True)
@example(case=fixed_case(B=1, T=150, H=2, K=64, V=64, dtype=torch.float16), chunk_size=64, qt_ds=False)
def test_dk_product_either_way_matches_reference(case, chunk_size, qt_ds, record, monkeypatch):
    """With chunk_o_bwd's dS^T Q taken as (Q^T dS)^T in its operand type (utils.QT_DS, the default; half
    operands at K = V = C = 64) or on float32 operands, every gradient equals the float64 reference within the
    dtype's gradient bound."""
    monkeypatch.setattr(U, "QT_DS", qt_ds)
    U.LAST_OPERANDS.clear()
    ours, refs, outs, routs = _run(case, chunk_size)
    _check_gradients(case, chunk_size, ours, refs, outs, routs, record, tag=" [Q^T dS]" if qt_ds else " [dS^T Q]")
    if case.T and case.dtype in HALF_DTYPES and chunk_size == case.K == case.V == 64:  # the half-operand path ran
        assert U.LAST_OPERANDS["chunk_o_bwd"][0] != U.tl_acc(case.dtype)


@given(case=delta_cases(dtypes=HALF_DTYPES, head_sizes=[17, 32, 40, 64] + ([100, 128] if ON_GPU else [])),
       chunk_size=st.sampled_from((32, 64)), kernels=st.sampled_from(("1",) + U.HALF_KERNELS),
       half_storage=st.booleans())
@example(case=fixed_case(B=2, T=150, H=2, K=64, V=40, dtype=HALF_DTYPES[-1]), chunk_size=64, kernels="1",
         half_storage=True)
@example(case=fixed_case(seqlens=(0, 67, 49), H=2, K=128, V=32, dtype=torch.float16), chunk_size=64, kernels="1",
         half_storage=True)
@example(case=fixed_case(seqlens=(1,), K=64, V=17, dtype=HALF_DTYPES[-1], seed=815351010, unit_keys=False,
                         beta_max=1.0, initial_state=False), chunk_size=64, kernels="1", half_storage=True)
def test_half_operands_match_reference(case, chunk_size, kernels, half_storage, record):
    """With half-precision tl.dot operands (DELTACHECK_HALF_OPERANDS) in any one chunk kernel or in all of them,
    and U, dv_local and the partial dk stored in half or not (DELTACHECK_HALF_STORAGE), o, the final state and
    every gradient stay within the dtype's bounds of the float64 reference. Every tile is at least 32 wide here
    (K, V >= 17, C >= 32); a named kernel takes the half path where its tiles are also equal (at C = 64 and
    32 < K, V <= 128 every kernel does), and that is checked."""
    named = U.half_kernels(kernels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(U, "HALF_OPERANDS", named)
        mp.setattr(U, "HALF_STORAGE", half_storage)
        U.LAST_OPERANDS.clear()
        ours, refs, outs, routs = _run(case, chunk_size)
        rec = _with(record, chunk_size=chunk_size, half=kernels)
        assert_close("o", outs[0], routs[0], case.dtype, record=rec)
        assert_close("final_state", outs[1], routs[1], case.dtype, record=rec)
        _check_gradients(case, chunk_size, ours, refs, outs, routs, record, tag=f"[half {kernels}]")
    taken = {n for n, (op, _) in U.LAST_OPERANDS.items() if op != U.tl_acc(case.dtype)}
    uniform = {n for n, (_, tiles) in U.LAST_OPERANDS.items() if len(set(tiles)) == 1 and tiles[0] >= 32}
    if case.T:  # (no tokens: no chunk, so nothing launched)
        assert taken == set(named) & uniform, f"half operands in {sorted(taken)}, asked for {sorted(named)}"
        if chunk_size == 64 and 32 < case.K <= 128 and 32 < case.V <= 128:  # every tile 64 wide: all of them
            assert taken == set(named) & set(U.LAST_OPERANDS)  # (utils.FUSED_STATE: no chunk_o_fwd, dv_local)


@given(case=delta_cases(dtypes=HALF_DTYPES, head_sizes=[17, 32, 64]), chunk_size=st.sampled_from((32, 64)))
@example(case=fixed_case(B=1, T=150, H=2, K=64, V=64, dtype=HALF_DTYPES[-1]), chunk_size=64)
def test_operand_storage_of_dv_new_and_dw_changes_nothing(case, chunk_size):
    """dv_new and dW, read only as dot operands, stored in their readers' half operand type (utils.read_storage)
    give bit for bit the gradients that float32 storage gives; at K = V = C = 64 they are stored in half."""
    inp = case.make()
    runs, chosen = [], []
    spy = U.read_storage
    for store in (spy, lambda dtype, *ops: U.acc_dtype(dtype)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(U, "read_storage", lambda *a, _f=store: chosen.append(_f(*a)) or chosen[-1])
            ours, _, outs, _ = _run(case, chunk_size, inp=inp)
            do, dht = _upstream(case, *outs)
            runs.append([outs[0], *_grads(outs, list(ours.values()), do, dht)])
    for a, b in zip(*runs):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    if case.T and chunk_size == case.K == case.V == 64:
        assert set(chosen[:2]) == {case.dtype}, chosen


@given(case=delta_cases())
@example(case=fixed_case(B=1, T=70, H=2, K=16, V=8, dtype=torch.float32, seqlens=None))
def test_chunk_size_invariance(case, record):
    """Chunk sizes 16, 32 and 64 compute the same function: outputs and gradients agree within the dtype
    bound."""
    inp = case.make()
    runs = {}
    for C in CHUNK_SIZES:
        ours, _, outs, _ = _run(case, C, inp=inp)
        do, dht = _upstream(case, *outs)
        runs[C] = (outs, _grads(outs, list(ours.values()), do, dht))
    names = [n for n in GRAD_NAMES if inp.get(n) is not None]
    (o16, ht16), g16 = runs[16]
    for C in (32, 64):
        (o, ht), g = runs[C]
        assert_close(f"o C={C} vs 16", o, o16, case.dtype, record=record)
        assert_close(f"final_state C={C} vs 16", ht, ht16, case.dtype, record=record)
        for name, a, b in zip(names, g, g16):
            assert_close(f"d{name} C={C} vs 16", a, b, case.dtype, "gradient", record=record)


@given(case=delta_cases(), chunk_size=st.sampled_from(CHUNK_SIZES))
@example(case=fixed_case(K=3, V=2, seqlens=(0, 1, 20), dtype=torch.float64), chunk_size=16)
def test_qk_l2norm_in_kernel(case, chunk_size, record):
    """use_qk_l2norm_in_kernel=True is the delta rule on l2-normalized q and k (reference.l2norm), forward and
    every gradient."""
    pytest.importorskip("ops.common.l2norm")
    if case.K == 1:  # l2norm of one number is +-1: its gradient is eps-sized, not a relative test
        case = dataclasses.replace(case, K=3)
    ours, refs, outs, routs = _run(case, chunk_size, l2norm=True)
    assert_close("o (l2norm)", outs[0], routs[0], case.dtype, record=record)
    assert_close("final_state (l2norm)", outs[1], routs[1], case.dtype, record=record)
    _check_gradients(case, chunk_size, ours, refs, outs, routs, record, tag=" (l2norm)")


GRADCHECK_CASES = {
    "two_chunks": dict(B=1, T=17, H=1, K=2, V=1, seqlens=None, small_tiles=False),
    "varlen_empty_and_length1": dict(B=1, T=20, H=1, K=2, V=3, seqlens=(0, 1, 19, 0), small_tiles=False),
    "batch_heads_multi_tile": dict(B=2, T=17, H=2, K=17, V=18, seqlens=None, small_tiles=True),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name):
    """torch.autograd.gradcheck (float64) of the Triton backward: q, k, v, beta and initial_state gradients of o
    and of the final state, chunk_size 16, across chunk boundaries and packed segments (empty, length 1)."""
    cfg = dict(GRADCHECK_CASES[name])
    small_tiles = cfg.pop("small_tiles")
    case = fixed_case(dtype=torch.float64, seed=7, initial_state=True, scale=0.8, **cfg)
    inp = case.make()
    leaves = [inp[n].detach().clone().requires_grad_() for n in GRAD_NAMES]
    cu = inp["cu_seqlens"]

    def fn(q, k, v, beta, s0):
        return chunk_delta_rule(q, k, v, beta, scale=0.8, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                chunk_size=16)

    with _small_tiles(small_tiles):
        # full Jacobians for the smallest case, random projections (fast_mode) for the larger ones
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=name != "two_chunks")


def test_empty_sequence_passes_state_through():
    """A packed empty segment leaves its initial state unchanged (final state == initial state exactly) and
    its initial-state gradient is exactly the final-state gradient."""
    case = fixed_case(seqlens=(5, 0, 3), H=2, K=8, V=4, dtype=torch.float32)
    ours, _, (o, ht), _ = _run(case, 16)
    s0 = ours["initial_state"]
    assert torch.equal(ht[1], s0[1].detach())
    dht = torch.randn_like(ht)
    (ds0,) = torch.autograd.grad((o, ht), (s0,), (torch.zeros_like(o), dht))
    assert torch.equal(ds0[1], dht[1])


@pytest.mark.parametrize("where", ["q", "k", "v", "beta", "initial_state"])
def test_nan_input_gives_nan_output(where):
    """A NaN in any input reaches the output: in o at the poisoned token (from then on, in its sequence, for
    k, v, beta and initial_state) and in that sequence's final state (except for q, which never enters it)."""
    case = fixed_case(seqlens=(6, 30), H=1, K=8, V=4, dtype=torch.float32)
    inp = case.make()
    t = 10  # second sequence, second chunk with chunk_size 16 starts at 22
    if where == "initial_state":
        inp[where][1, 0, 2, 1] = float("nan")
    elif where == "beta":
        inp[where][0, t, 0] = float("nan")
    else:
        inp[where][0, t, 0, 0] = float("nan")
    o, ht = chunk_delta_rule(**{n: inp[n] for n in GRAD_NAMES}, scale=None, output_final_state=True,
                             cu_seqlens=inp["cu_seqlens"], chunk_size=16)
    start = 6 if where == "initial_state" else t
    assert torch.isnan(o[0, start]).any() and torch.isnan(o[0, -1]).any() == (where != "q")
    assert not torch.isnan(o[0, :6]).any() and not torch.isnan(ht[0]).any()
    assert torch.isnan(ht[1]).any() == (where != "q")


def _good():
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 6, 2, 4, 3
    return dict(q=torch.randn(B, T, H, K, generator=g), k=torch.randn(B, T, H, K, generator=g),
                v=torch.randn(B, T, H, V, generator=g), beta=torch.rand(B, T, H, generator=g))


def _to(d):
    return {n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for n, x in d.items()}


BAD_INPUTS = {
    "chunk_size 48": (dict(chunk_size=48), ValueError, "chunk_size"),
    "chunk_size 16.0": (dict(chunk_size=16.0), ValueError, "chunk_size"),
    "k shape": (dict(k=torch.zeros(1, 6, 2, 5)), ValueError, "k must"),
    "v 3-D": (dict(v=torch.zeros(1, 6, 2)), ValueError, "v must"),
    "v rows": (dict(v=torch.zeros(1, 5, 2, 3)), ValueError, "v must"),
    "beta shape": (dict(beta=torch.zeros(1, 6, 3)), ValueError, "beta must"),
    "beta dtype": (dict(beta=torch.zeros(1, 6, 2, dtype=torch.float64)), TypeError, "beta"),
    "integer q": (dict(q=torch.zeros(1, 6, 2, 4, dtype=torch.int32)), TypeError, "q"),
    "head size 300": (dict(q=torch.zeros(1, 6, 2, 300), k=torch.zeros(1, 6, 2, 300)), ValueError, "head size"),
    "initial_state shape": (dict(initial_state=torch.zeros(2, 2, 4, 3)), ValueError, "initial_state"),
    "cu_seqlens start": (dict(cu_seqlens=torch.tensor([1, 6])), ValueError, "cu_seqlens"),
    "cu_seqlens end": (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
    "cu_seqlens decreasing": (dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    "cu_seqlens float": (dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    "cu_seqlens 2-D": (dict(cu_seqlens=torch.tensor([[0, 6]])), ValueError, "cu_seqlens"),
    "scale string": (dict(scale="0.5"), TypeError, "scale"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises(name):
    """Bad arguments raise a ValueError/TypeError that names the argument, before any kernel runs."""
    change, exc, match = BAD_INPUTS[name]
    kw = _good()
    kw.update(change)
    with pytest.raises(exc, match=match):
        chunk_delta_rule(**_to(kw))


def test_cu_seqlens_needs_batch_one():
    """cu_seqlens packs sequences along T, so B must be 1."""
    kw = _good()
    kw = {n: torch.cat([x, x]) for n, x in kw.items()}
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_delta_rule(**_to(kw), cu_seqlens=torch.tensor([0, 6], device=DEVICE))


@pytest.mark.skipif(not ON_GPU, reason="long sequences and large heads need the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_long_sequence_large_heads(dtype, record):
    """T = 4096 with K = V = 128 (two sequences, one packed ragged), and K = V = 256: o and the final state
    within the forward bound; the per-chunk states stay in float32, so bf16 does not lose accuracy with T."""
    for seqlens, K in (((1000, 3096), 128), ((2048,), 256)):
        case = fixed_case(seqlens=seqlens, H=2, K=K, V=K, dtype=dtype, seed=3)
        _, _, (o, ht), (ro, rht) = _run(case, 64)
        assert_close(f"o T={sum(seqlens)} K={K}", o, ro, dtype, record=record)
        assert_close(f"final_state T={sum(seqlens)} K={K}", ht, rht, dtype, record=record)
