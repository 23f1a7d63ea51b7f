"""Properties of the DPLR delta rule ops (ops.generalized_delta_rule: chunk and fused recurrent) against the float64
token-by-token reference: S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t."""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ops.common.utils as utils
import ops.generalized_delta_rule.dplr.chunk_A as chunk_A
import ops.generalized_delta_rule.dplr.fused_recurrent as fused_recurrent
import reference
from ops.generalized_delta_rule import chunk_dplr_delta_rule, chunk_iplr_delta_rule, fused_recurrent_dplr_delta_rule
from properties.generalized_support import (
    BAD_INPUTS,
    CHUNK_SIZES,
    EDGE_CASES,
    RAW_MAX_T,
    bad,
    check_op,
    chunk_op,
    edge_examples,
    gradcheck_fast,
    gradcheck_inputs,
    inputs,
    leaves,
    nonempty,
    small_tiles,
    upstream,
    with_fields,
)
from properties.strategies import DEVICE, ON_GPU, OP_DTYPES, delta_cases, fixed_case
from properties.tolerances import assert_close

# decay families: gk = -0.5 U(0, 1) (a 16-token block's decay stays within chunk_A.DIAG_MAX: its diagonal blocks as
# products), -5 U(0, 1), and strong decay gk = -20 U(0, 1) with 15% of the entries exactly -20 and 15% exactly 0
# (non-decaying channels next to ones that forget within a token)
DECAYS = {"weak": (-0.5, False), "mild": (-5.0, False), "strong": (-20.0, True)}
OPS = {"chunk": chunk_dplr_delta_rule, "fused_recurrent": fused_recurrent_dplr_delta_rule}


def draw_inputs(case, family, decay, gk_f32):
    if family == "raw" and case.T > RAW_MAX_T:
        family = "stable"
    low, ends = DECAYS[decay]
    gk_dtype = torch.float32 if gk_f32 and case.dtype != torch.float64 else case.dtype
    return inputs(case, family, decay=low, ends=ends, gk_dtype=gk_dtype), family


@given(case=delta_cases(), family=st.sampled_from(["stable", "raw"]), decay=st.sampled_from(list(DECAYS)),
       gk_f32=st.booleans(), chunk_size=st.sampled_from(CHUNK_SIZES), tiles=st.booleans(),
       output_final_state=st.booleans(), unroll=st.sampled_from([1, 4]), diag_max=st.sampled_from([-1.0, 30.0]))
@edge_examples(family="stable", decay="strong", gk_f32=False, chunk_size=16, tiles=True, output_final_state=True,
               unroll=1, diag_max=30.0)
@example(case=EDGE_CASES[2], family="stable", decay="mild", gk_f32=True, chunk_size=64, tiles=False,
         output_final_state=True, unroll=4, diag_max=-1.0)  # several 16-row blocks in one chunk (the dgk carry)
@example(case=EDGE_CASES[2], family="stable", decay="weak", gk_f32=False, chunk_size=64, tiles=True,
         output_final_state=True, unroll=4, diag_max=30.0)  # diagonal blocks as products
def test_chunk_dplr_matches_reference(case, family, decay, gk_f32, chunk_size, tiles, output_final_state, unroll,
                                      diag_max, record):
    """chunk_dplr_delta_rule's o and final state equal the float64 reference within the forward bound, and its
    gradients for q, k, v, a, b, gk and initial_state (random upstream gradients) within the gradient bound: stable
    and raw a, b, weak, mild and strong decay (down to -20 per token), gk in the input dtype or float32, any chunk
    size and tile split, chunk_A's token loops one or four tokens a step, its diagonal blocks (forward and
    backward) token by token or (where the decays allow) as products."""
    case = nonempty(case)
    x, family = draw_inputs(case, family, decay, gk_f32)
    with small_tiles(tiles), pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_A, "FWD_UNROLL", unroll)
        mp.setattr(chunk_A, "BWD_UNROLL", unroll)
        mp.setattr(chunk_A, "DIAG_MAX", diag_max)
        check_op(chunk_op(chunk_size, chunk_dplr_delta_rule), reference.dplr_recurrent, x, case.dtype,
                 with_fields(record, chunk_size=chunk_size, family=family, decay=decay), output_final_state)


HALF_DTYPES = [d for d in OP_DTYPES if d in (torch.float16, torch.bfloat16)]


def test_dplr_half_operand_switch_names_its_kernel_sets():
    """DELTACHECK_DPLR_HALF_OPERANDS: 0 names no kernel, 1 the chunk_o kernels, all adds the candidates (wy_fast's
    and chunk_h's); any other value is refused with the variable's name."""
    assert utils.dplr_half_kernels("0") == frozenset()
    assert utils.dplr_half_kernels("1") == frozenset(utils.DPLR_HALF_KERNELS)
    assert utils.dplr_half_kernels("all") == frozenset(utils.DPLR_HALF_KERNELS + utils.DPLR_HALF_CANDIDATES)
    assert {"dplr_wy_fwd", "dplr_wy_bwd", "dplr_chunk_h_fwd", "dplr_chunk_h_bwd"} <= set(utils.DPLR_HALF_CANDIDATES)
    assert not set(utils.DPLR_HALF_CANDIDATES) & utils.dplr_half_kernels("1")
    with pytest.raises(ValueError, match="DELTACHECK_DPLR_HALF_OPERANDS"):
        utils.dplr_half_kernels("yes")


@given(case=delta_cases(dtypes=HALF_DTYPES, head_sizes=[17, 32, 64] + ([128] if ON_GPU else []),
                        max_T=150 if ON_GPU else 90),
       decay=st.sampled_from([None] + list(DECAYS)), chunk_size=st.sampled_from((32, 64)),
       kernels=st.sampled_from((",".join(utils.DPLR_HALF_KERNELS),
                                ",".join(utils.DPLR_HALF_KERNELS + utils.DPLR_HALF_CANDIDATES))
                               + utils.DPLR_HALF_KERNELS + utils.DPLR_HALF_CANDIDATES))
@example(case=fixed_case(B=2, T=100, H=2, K=64, V=64, dtype=HALF_DTYPES[-1]), decay="strong", chunk_size=64,
         kernels=",".join(utils.DPLR_HALF_KERNELS + utils.DPLR_HALF_CANDIDATES))
@example(case=fixed_case(seqlens=(0, 67, 49), H=2, K=64, V=32, dtype=torch.float16), decay="mild", chunk_size=32,
         kernels=",".join(utils.DPLR_HALF_KERNELS + utils.DPLR_HALF_CANDIDATES))
def test_chunk_dplr_half_operands_match_reference(case, decay, chunk_size, kernels, record):
    """With half-precision tl.dot operands (utils.DPLR_HALF_KERNELS, the chunk_o kernels, and the candidates
    utils.DPLR_HALF_CANDIDATES, wy_fast's and chunk_h's) in any one of them, the chunk_o ones or all of them, the
    DPLR (weak, mild or strong decay) and IPLR (decay None) chunk forms' o, final state and every gradient stay
    within the dtype's bounds of the float64 reference. Tiles are at least 32 wide here (K, V >= 17, C >= 32); a
    named kernel takes the half path exactly where its tiles are also equal, and that is checked (at C = K = V = 64
    every named kernel takes it, the first example's chunk_h included)."""
    case = nonempty(case)
    named = utils.half_kernels(kernels)
    x = inputs(case, "stable", *DECAYS[decay]) if decay else inputs(case, "stable")
    op = chunk_dplr_delta_rule if decay else chunk_iplr_delta_rule
    ref = reference.dplr_recurrent if decay else reference.iplr_recurrent
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "HALF_OPERANDS", named)
        utils.LAST_OPERANDS.clear()
        check_op(chunk_op(chunk_size, op), ref, x, case.dtype, with_fields(record, chunk_size=chunk_size,
                                                                          decay=decay, half=kernels))
    dplr = {n: tiles for n, (_, tiles) in utils.LAST_OPERANDS.items() if n.startswith("dplr_")}
    taken = {n for n in dplr if utils.LAST_OPERANDS[n][0] != utils.tl_acc(case.dtype)}
    assert set(dplr) == set(utils.DPLR_HALF_KERNELS + utils.DPLR_HALF_CANDIDATES)
    assert taken == {n for n in named if len(set(dplr[n])) == 1}, f"half operands in {sorted(taken)}"
    if chunk_size == 64 and case.K == case.V == 64:
        assert taken == named


@pytest.mark.parametrize("decay", [None, "mild"])
def test_dplr_operand_only_intermediates_stored_half_change_nothing(decay):
    """The DPLR / IPLR intermediates read only as dot operands (q exp(G), a exp(G^-), k and b exp(gamma - G), A_qk,
    A_qb, A_ak, X, Wm, W, dW, dWm), stored in their readers' half operand type, give bit for bit the o, final state
    and gradients that float32 storage gives (the readers round them so anyway); at C = K = V = 64 they are stored
    half, and with utils.HALF_STORAGE so are the added-to ones (U, h, dh, dW_loc, dV_loc, dV)."""
    import ops.generalized_delta_rule.dplr.chunk as dplr_chunk
    half = HALF_DTYPES[-1]
    case = fixed_case(seqlens=(0, 67, 49), H=2, K=64, V=64, dtype=half)
    x = inputs(case, "stable", *DECAYS[decay]) if decay else inputs(case, "stable")
    op = chunk_dplr_delta_rule if decay else chunk_iplr_delta_rule
    read_only = {"qh", "ah", "kbt", "aq", "aak", "x", "wm", "w", "dw", "dwm"}
    runs = []
    for setting in ("all", "read_only", "none"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(utils, "HALF_STORAGE", setting == "all")
            mp.setattr(utils, "DPLR_HALF_STORAGE", setting != "none")
            if setting == "all":
                assert set(dplr_chunk.storage(half, 64, 64, 64)) == {half}
                continue
            st_now = dplr_chunk.storage(half, 64, 64, 64)
            want = {f: (half if setting == "read_only" and f in read_only else torch.float32) for f in st_now._fields}
            assert st_now._asdict() == want
            ours, _ = leaves(x)
            o, ht = op(**ours, scale=x["scale"], output_final_state=True, cu_seqlens=x["cu_seqlens"], chunk_size=64)
            outs, grads_out = upstream(o, ht, 0)
            runs.append([o, ht, *torch.autograd.grad(outs, list(ours.values()), grads_out)])
    for a, b in zip(*runs):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@given(case=delta_cases(), family=st.sampled_from(["stable", "raw"]), decay=st.sampled_from(list(DECAYS)),
       gk_f32=st.booleans(), tiles=st.booleans(), output_final_state=st.booleans())
@edge_examples(family="stable", decay="strong", gk_f32=False, tiles=True, output_final_state=True)
def test_fused_recurrent_dplr_matches_reference(case, family, decay, gk_f32, tiles, output_final_state, record):
    """fused_recurrent_dplr_delta_rule's o, final state and all input gradients (q, k, v, a, b, gk, initial_state)
    equal the float64 reference within the forward / gradient bounds, V split over programs or not."""
    case = nonempty(case)
    x, family = draw_inputs(case, family, decay, gk_f32)
    with small_tiles(tiles):
        check_op(fused_recurrent_dplr_delta_rule, reference.dplr_recurrent, x, case.dtype,
                 with_fields(record, family=family, decay=decay), output_final_state)


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_dplr_decay_of_minus_20_stays_finite_and_accurate(form, dtype, record):
    """gk = -20 on every token and channel (exp(-20 * 64) underflows; any exp(+G) would overflow) over several
    chunks of 32 (two 16-row blocks each): outputs and gradients are finite and within the bounds. dgk is then
    ~exp(-20) times the other gradients, below float16's smallest subnormal, so half-precision inputs take gk in
    float32 (as the API allows) and get dgk in float32."""
    case = fixed_case(T=70, H=2, K=8, V=4, dtype=dtype, seed=21, unit_keys=False)
    x = inputs(case)
    x["gk"] = torch.full(x["q"].shape, -20.0, dtype=utils.acc_dtype(dtype), device=DEVICE)
    op = chunk_op(32, chunk_dplr_delta_rule) if form == "chunk" else fused_recurrent_dplr_delta_rule
    check_op(op, reference.dplr_recurrent, x, dtype, record)


@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_chunk_dplr_diagonal_products_match_reference(dtype, record):
    """chunk_A's diagonal blocks as products (chunk_A.DIAG_MAX = 30, weak decay: every block takes them; the output
    differs from the token loops', so they ran) give o, the final state and every gradient within the bounds of
    the float64 reference, like the token loops, with a 16-token block past DIAG_MAX (gk = -20 on a few tokens)
    taking the token loops in the same call."""
    case = fixed_case(T=100, H=2, K=24, V=16, dtype=dtype, seed=23, unit_keys=False)
    x = inputs(case, "stable", *DECAYS["weak"])
    x["gk"][:, 70:73] = -20.0
    out = {}
    for diag_max in (-1.0, 30.0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(chunk_A, "DIAG_MAX", diag_max)
            out[diag_max] = check_op(chunk_op(64, chunk_dplr_delta_rule), reference.dplr_recurrent, x, dtype,
                                     with_fields(record, diag_max=diag_max))
    assert not torch.equal(out[-1.0], out[30.0])


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("chunk_size", [32, 64])
def test_dplr_decay_past_exp_range_at_chunk_starts_stays_finite(form, dtype, chunk_size, record):
    """gk = -200 (exp(200) overflows float32; exp(-200) underflows it) on the first token of every chunk and on a
    few others, mild decay elsewhere: outputs and gradients are finite and within the bounds. (chunk_A's
    factor exp(G^-_i - G_r) is exp(-gk_0) on a chunk's first row, where no column j < 0 needs it.)"""
    case = fixed_case(T=90, H=2, K=16, V=8, dtype=dtype, seed=22, unit_keys=False)
    x = inputs(case, decay=-1.0, gk_dtype=utils.acc_dtype(dtype))
    x["gk"][:, ::chunk_size] = -200.0
    x["gk"][:, 5::37] = -200.0
    op = chunk_op(chunk_size, chunk_dplr_delta_rule) if form == "chunk" else fused_recurrent_dplr_delta_rule
    check_op(op, reference.dplr_recurrent, x, dtype, with_fields(record, chunk_size=chunk_size))


def test_fused_recurrent_dplr_checkpoint_segments(monkeypatch, record):
    """With a short checkpoint segment (4 tokens) sequences span many segments, segment ends fall inside packed
    sequences, and the recomputed states still give the reference gradients."""
    monkeypatch.setattr(fused_recurrent, "CK", 4)
    case = fixed_case(K=5, V=3, H=2, dtype=torch.float64, seqlens=(9, 0, 1, 4, 13), seed=5)
    check_op(fused_recurrent_dplr_delta_rule, reference.dplr_recurrent, inputs(case, decay=-5.0), case.dtype,
             record)


@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("varlen", [False, True])
def test_dplr_gradcheck(form, varlen):
    """float64 torch.autograd.gradcheck of the Triton backward (q, k, v, a, b, gk, initial_state through o and the
    final state) on tiny shapes, packed layout with an empty and a length-1 segment included."""
    args, cu = gradcheck_inputs(varlen, decay=True)
    fn = {"chunk": chunk_op(16, chunk_dplr_delta_rule), "fused_recurrent": fused_recurrent_dplr_delta_rule}[form]

    def f(q, k, v, a, b, gk, h0):
        return fn(q=q, k=k, v=v, a=a, b=b, gk=gk, scale=0.8, initial_state=h0, output_final_state=True,
                  cu_seqlens=cu)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=gradcheck_fast(form, varlen))


@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_fused_recurrent_dplr_decode_carries_state(dtype, record):
    """Decoding one token at a time (T = 1, B = 3) and carrying the final state into the next call reproduces
    the reference on the whole sequence (NaN-poisoned output buffers: every element is written)."""
    case = fixed_case(B=3, T=4, H=2, K=8, V=5, dtype=dtype, seed=11)
    x = inputs(case, decay=-5.0)
    names = ("q", "k", "v", "a", "b", "gk")
    ro, rht = reference.dplr_recurrent(*(x[n] for n in names), initial_state=x["initial_state"],
                                       output_final_state=True)
    state, outs = x["initial_state"], []
    for t in range(case.T):
        o, state = fused_recurrent_dplr_delta_rule(*(x[n][:, t:t + 1] for n in names), initial_state=state,
                                                   output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(state).all()
        outs.append(o)
    assert_close("o", torch.cat(outs, 1), ro, dtype, "forward", record=record)
    assert_close("final_state", state, rht, dtype, "forward", record=record)


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("where", ["q", "gk"])
def test_dplr_nan_gives_nan(form, where):
    """A NaN in q (sequence 1, token 1, head 0) makes that o row NaN; a NaN in gk makes that sequence and head's
    o NaN from that token on and its final state NaN. Other sequences and heads stay finite, and so do the
    earlier tokens in the fused recurrent form (the chunk form's matrix products may spread the NaN to earlier
    rows of the same chunk). No crash either way."""
    case = fixed_case(B=2, T=3, H=2, K=8, V=4, dtype=torch.float32, seed=3)
    x = inputs(case, decay=-5.0)
    x[where][1, 1, 0, 5] = math.nan
    o, ht = OPS[form](*(x[n] for n in ("q", "k", "v", "a", "b", "gk")), initial_state=x["initial_state"],
                      output_final_state=True)
    if where == "q":
        assert torch.isnan(o[1, 1, 0]).all() and torch.isfinite(ht).all()
    else:
        assert torch.isnan(o[1, 1:, 0]).all() and torch.isnan(ht[1, 0]).all()
        assert torch.isfinite(ht[0]).all() and torch.isfinite(ht[1, 1]).all()
    assert torch.isfinite(o[0]).all() and torch.isfinite(o[:, :, 1]).all()
    if form == "fused_recurrent" or where == "q":
        assert torch.isfinite(o[1, 0, 0]).all() and (where == "gk" or torch.isfinite(o[1, 2, 0]).all())


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("varlen", [False, True])
def test_dplr_empty_input(form, varlen):
    """T = 0 (or only empty segments): o is empty, the final state is the initial state (zeros without one),
    and the initial state's gradient is the final state's upstream gradient."""
    H, K, V = 2, 3, 5
    B, N, cu = (1, 3, torch.zeros(4, dtype=torch.long, device=DEVICE)) if varlen else (2, 2, None)
    q = torch.randn(B, 0, H, K, device=DEVICE, requires_grad=True)
    v = torch.randn(B, 0, H, V, device=DEVICE, requires_grad=True)
    gk = torch.randn(B, 0, H, K, device=DEVICE, requires_grad=True)
    h0 = torch.randn(N, H, K, V, device=DEVICE, requires_grad=True)
    o, ht = OPS[form](q, q, v, q, q, gk, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (B, 0, H, V)
    assert torch.equal(ht, h0)
    dht = torch.randn_like(ht)
    dq, dgk, dh0 = torch.autograd.grad((o, ht), (q, gk, h0), (torch.zeros_like(o), dht))
    assert torch.equal(dh0, dht) and dq.shape == q.shape and dgk.shape == gk.shape
    _, ht = OPS[form](q, q, v, q, q, gk, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(ht, torch.zeros(N, H, K, V, device=DEVICE))


def bad_dplr(**kw):
    gk = kw.pop("gk", None)
    args = bad(**kw)
    args["gk"] = -torch.rand(args["q"].shape, device=DEVICE) if gk is None else gk
    return args


DPLR_BAD_INPUTS = [
    ({**kwargs, "gk": -torch.rand(kwargs["q"].shape, device=DEVICE)}, match) for kwargs, match in BAD_INPUTS
] + [
    (bad_dplr(gk=torch.randn(1, 6, 2, 5)), "gk"),
    (bad_dplr(gk=torch.randn(1, 6, 2)), "gk"),
    (bad_dplr(gk=torch.randn(1, 6, 2, 4, dtype=torch.float64)), "gk"),
    (bad_dplr(gk=torch.ones(1, 6, 2, 4, dtype=torch.long)), "gk"),
    ({**bad(), "gk": None}, "gk"),
]


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("kwargs, match", DPLR_BAD_INPUTS)
def test_dplr_rejects_bad_input(form, kwargs, match):
    """Malformed input raises a ValueError or TypeError that names the offending argument."""
    with pytest.raises((ValueError, TypeError), match=match):
        OPS[form](**kwargs)
