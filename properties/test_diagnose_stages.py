"""benchmarks/diagnose_stages.py holds each kernel of the chunk form against float64 math on that kernel's own
inputs: every stage agrees to rounding, and a fault in one stage is named there and not in the stages after it."""
import pytest
import torch

import benchmarks.diagnose_stages as D
from properties.strategies import DEVICE
from properties.tolerances import UNIT_ROUNDOFF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_stage_matches_its_float64_math(dtype):
    """Every forward and backward stage output of a packed batch (an empty sequence, one past a chunk boundary)
    is within 64 u of the float64 stage math on the kernel's own inputs, in the batch and in its worst sequence."""
    rows = D.diagnose([0, 19, 5], H=2, K=16, V=16, dtype=dtype, chunk_size=16, seed=1, device=DEVICE)
    assert {r["stage"] for r in rows} == {"wy_fwd", "chunk_h_fwd", "chunk_o_fwd", "chunk_dv_local", "chunk_h_bwd",
                                          "chunk_o_bwd", "wy_bwd"}
    bad = [r for r in rows if not max(r["err"], r["worst_sequence"]) <= 64 * UNIT_ROUNDOFF[dtype]]
    assert not bad, bad


def test_a_faulty_stage_is_named_and_not_the_stages_after_it(monkeypatch):
    """A chunk_h_fwd that returns v_new 1e-3 off shows as a chunk_h_fwd v_new error; chunk_o_fwd, which reads
    that v_new, is held against float64 math on the same v_new and stays at rounding level."""
    real = D.chunk_h_fwd

    def faulty(*a, **kw):
        h, v_new, ht, o = real(*a, **kw)
        return h, v_new * (1 + 1e-3), ht, o

    monkeypatch.setattr(D, "chunk_h_fwd", faulty)
    rows = {(r["stage"], r["output"]): r["err"] for r in
            D.diagnose([0, 19, 5], H=1, K=16, V=16, dtype=torch.float32, chunk_size=16, seed=2, device=DEVICE)}
    assert rows[("chunk_h_fwd", "v_new")] > 5e-4
    assert rows[("chunk_o_fwd", "o")] < 1e-5 and rows[("chunk_h_fwd", "h")] < 1e-5
