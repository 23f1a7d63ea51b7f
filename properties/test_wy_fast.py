"""Properties of the WY (UT) stage of the chunked delta rule (ops.delta_rule.wy_fast) and of the unit
lower-triangular inverse it is built on (ops.common.solve_tril)."""
import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ops.common.utils as utils
import ops.delta_rule.wy_fast as wf
from ops.common.solve_tril import solve_tril
from properties.strategies import DEVICE, delta_cases, fixed_case
from properties.tolerances import assert_close
from reference.delta_rule import wy_representation

CHUNK_SIZES = (16, 32, 64)


def _case(**kw):
    """strategies.fixed_case without an initial state (the WY stage has none)."""
    return fixed_case(**{"initial_state": False, **kw})


@contextlib.contextmanager
def _small_tiles(enabled):
    """Lower the K/V tile to 16 so the small interpreter head sizes still loop over several tiles."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            mp.setattr(wf, "TILE", 16)
        yield


def _chunks(inp, chunk_size):
    """[start, end) of every chunk of every sequence in the flattened B*T token axis, and the kernels'
    offsets and chunk map."""
    B, T = inp["q"].shape[:2]
    offsets, cmap, _, _ = utils.chunk_index(inp["cu_seqlens"], B, T, chunk_size, inp["q"].device)
    off = offsets.tolist()
    spans = [(off[n] + c * chunk_size, min(off[n] + (c + 1) * chunk_size, off[n + 1])) for n, c in cmap.tolist()]
    return spans, offsets, cmap


def _flat(x):
    return x.reshape(-1, *x.shape[2:])  # [B*T, H, ...]


@given(case=delta_cases(varlen=True), chunk_size=st.sampled_from(CHUNK_SIZES), small_tiles=st.booleans())
@example(case=_case(seqlens=(0, 1, 17, 0, 40), K=3, V=5, dtype=torch.float64), chunk_size=16, small_tiles=False)
@example(case=_case(seqlens=(33,), H=2, K=24, V=20, dtype=torch.float32), chunk_size=32, small_tiles=True)
def test_wy_matches_householder_products(case, chunk_size, small_tiles, record):
    """Per chunk: I - K^T W = prod_i (I - beta_i k_i k_i^T) (newest on the left) and
    K^T U = sum_i (prod_{j>i} (I - beta_j k_j k_j^T)) beta_i k_i v_i^T, the explicit Householder products;
    also for partial last chunks of packed sequences."""
    inp = case.make()
    k, v, beta = inp["k"], inp["v"], inp["beta"]
    chunks, offsets, cmap = _chunks(inp, chunk_size)
    with _small_tiles(small_tiles):
        w, u, x = wf.wy_fwd(k, v, beta, offsets, cmap, chunk_size)
    kd, vd, bd = _flat(k).double().cpu(), _flat(v).double().cpu(), _flat(beta).double().cpu()
    w, u = _flat(w).double().cpu(), _flat(u).double().cpu()
    eye = torch.eye(case.K, dtype=torch.float64)
    got_p, ref_p, got_h, ref_h = [], [], [], []
    for s, e in chunks:
        P = eye.expand(case.H, -1, -1)
        Hs = torch.zeros(case.H, case.K, case.V, dtype=torch.float64)
        for t in range(s, e):
            kk = kd[t][:, :, None] * kd[t][:, None, :]
            G = eye - bd[t][:, None, None] * kk
            P = G @ P
            Hs = G @ Hs + bd[t][:, None, None] * kd[t][:, :, None] * vd[t][:, None, :]
        Kc = kd[s:e].transpose(0, 1)  # [H, C, K]
        got_p.append(Kc.transpose(-1, -2) @ w[s:e].transpose(0, 1))
        ref_p.append(eye - P)
        got_h.append(Kc.transpose(-1, -2) @ u[s:e].transpose(0, 1))
        ref_h.append(Hs)
    if not chunks:
        return
    assert_close("K^T W vs I - prod(I - beta k k^T)", torch.stack(got_p), torch.stack(ref_p), case.dtype,
                 record=record)
    assert_close("K^T U vs H", torch.stack(got_h), torch.stack(ref_h), case.dtype, record=record)


@given(case=delta_cases(varlen=True), chunk_size=st.sampled_from(CHUNK_SIZES), small_tiles=st.booleans())
@example(case=_case(seqlens=(0, 1, 17, 0, 40), K=3, V=5, dtype=torch.float64), chunk_size=16, small_tiles=True)
def test_wy_backward_matches_reference_gradients(case, chunk_size, small_tiles, record):
    """wy_bwd's dk, dv, dbeta for random dW, dU equal the float64 autograd gradients of
    reference.wy_representation, chunk by chunk."""
    inp = case.make()
    k, v, beta = inp["k"], inp["v"], inp["beta"]
    chunks, offsets, cmap = _chunks(inp, chunk_size)
    acc = utils.acc_dtype(case.dtype)
    g = torch.Generator().manual_seed(case.seed + 1)
    dw = torch.randn(k.shape, generator=g, dtype=torch.float64).to(device=k.device, dtype=acc)
    du = torch.randn(v.shape, generator=g, dtype=torch.float64).to(device=k.device, dtype=acc)
    dk_in = torch.randn(k.shape, generator=g, dtype=torch.float64).to(device=k.device, dtype=acc)
    with _small_tiles(small_tiles):
        _, _, x = wf.wy_fwd(k, v, beta, offsets, cmap, chunk_size)
        dk, dv, dbeta = wf.wy_bwd(k, v, beta, x, dw, du, dk_in, offsets, cmap, chunk_size)
    assert dk.dtype == dv.dtype == dbeta.dtype == case.dtype

    kd = _flat(k).double().cpu().requires_grad_()
    vd = _flat(v).double().cpu().requires_grad_()
    bd = _flat(beta).double().cpu().requires_grad_()
    dwd, dud = _flat(dw).double().cpu(), _flat(du).double().cpu()
    loss = (_flat(dk_in).double().cpu() * kd).sum()
    for s, e in chunks:
        W, U, _ = wy_representation(kd[s:e].transpose(0, 1), vd[s:e].transpose(0, 1), bd[s:e].T)
        loss = loss + (W * dwd[s:e].transpose(0, 1)).sum() + (U * dud[s:e].transpose(0, 1)).sum()
    rk, rv, rb = torch.autograd.grad(loss, (kd, vd, bd), allow_unused=True, materialize_grads=True)
    assert_close("dk", _flat(dk), rk, case.dtype, "gradient", record=record)
    assert_close("dv", _flat(dv), rv, case.dtype, "gradient", record=record)
    assert_close("dbeta", _flat(dbeta), rb, case.dtype, "gradient", record=record)


@given(C=st.sampled_from([16, 32, 64]), dtype=st.sampled_from([torch.float32, torch.float64]),
       kind=st.sampled_from(["delta", "random"]), batch=st.integers(1, 3), seed=st.integers(0, 2 ** 31 - 1))
@example(C=64, dtype=torch.float64, kind="delta", batch=1, seed=0)
@example(C=16, dtype=torch.float32, kind="random", batch=2, seed=1)
def test_solve_tril_matches_torch(C, dtype, kind, batch, seed, record):
    """solve_tril(A) = (I + tril(A, -1))^-1 as torch.linalg.solve_triangular computes it (float64 reference on
    the same rounded A); the diagonal and upper triangle of A are ignored. 'delta' draws A = beta_i k_i.k_j
    (unit keys, beta in [0, 2]) as the WY stage builds it; 'random' draws N(0, 1/C) entries."""
    g = torch.Generator().manual_seed(seed)
    if kind == "delta":
        kdim = int(torch.randint(2, 65, (1,), generator=g))
        kk = torch.nn.functional.normalize(torch.randn(batch, C, kdim, generator=g, dtype=torch.float64), dim=-1)
        beta = 2 * torch.rand(batch, C, 1, generator=g, dtype=torch.float64)
        A = beta * kk @ kk.transpose(-1, -2)
    else:
        A = torch.randn(batch, C, C, generator=g, dtype=torch.float64) / C ** 0.5
    A = A.to(dtype)
    lower = torch.tril(A.double(), -1)
    garbage = torch.triu(torch.randn(batch, C, C, generator=g, dtype=torch.float64), 0).to(dtype)
    X = solve_tril((torch.tril(A, -1) + garbage).to(DEVICE))
    assert X.dtype == dtype and X.shape == (batch, C, C)
    eye = torch.eye(C, dtype=torch.float64).expand(batch, C, C)
    ref = torch.linalg.solve_triangular(eye + lower, eye, upper=False, unitriangular=True)
    assert_close(f"solve_tril C={C} {kind}", X, ref, dtype, record=record)


def test_solve_tril_rejects_bad_shapes():
    """solve_tril needs [..., C, C] with C in (16, 32, 64)."""
    for shape in [(3, 48, 48), (2, 128, 128), (16, 32), (16,)]:
        with pytest.raises(ValueError, match="A must be"):
            solve_tril(torch.zeros(shape, device=DEVICE))
