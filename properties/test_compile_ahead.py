"""The first call at a new shape compiles the op's forward and backward kernels in a dry run, side by side
(ops/common/compile_ahead.py): the real call, forward and backward, then compiles nothing itself."""
import pytest
import torch
import triton.runtime.jit as jit

import ops
from ops.common import compile_ahead
from properties.strategies import ON_GPU

pytestmark = pytest.mark.skipif(not ON_GPU, reason="the dry run compiles for the GPU; the interpreter compiles nothing")

# a head size and head count no other test draws, so every kernel specialization here is new to the process
T, H, K, V = 37, 3, 40, 24


def _inputs(name, dtype):
    g = torch.Generator(device="cuda").manual_seed(7)

    def r(*s):
        return torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype).requires_grad_()
    x = dict(q=r(1, T, H, K), k=r(1, T, H, K), v=r(1, T, H, V))
    if name in ("chunk_delta_rule", "fused_recurrent_delta_rule"):
        x["k"] = torch.nn.functional.normalize(x["k"].detach().float(), dim=-1).to(dtype).requires_grad_()
        x["beta"] = torch.rand(1, T, H, generator=g, device="cuda").to(dtype).requires_grad_()
    else:
        kn = torch.nn.functional.normalize(x["k"].detach().float(), dim=-1)
        x["a"], x["b"] = (-kn).to(dtype).requires_grad_(), (kn * 0.5).to(dtype).requires_grad_()
        x["gk"] = (-torch.rand(1, T, H, K, generator=g, device="cuda")).requires_grad_()
    x["initial_state"] = torch.randn(1, H, K, V, generator=g, device="cuda").requires_grad_()
    return x


@pytest.mark.parametrize("name", ["chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_dplr_delta_rule"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_first_call_compiles_every_kernel_ahead(name, dtype, monkeypatch):
    """At a new shape the dry run compiles the op's kernels (at least one), the real forward and backward then
    compile none, and the outputs and gradients are finite."""
    monkeypatch.setattr(compile_ahead, "_SEEN", set())
    monkeypatch.setattr(compile_ahead, "ENABLED", True)
    compiles = {"dry": 0, "real": 0}
    do_compile = jit.JITFunction._do_compile

    def counted(self, *args, **kwargs):
        compiles["dry" if compile_ahead.active() else "real"] += 1
        return do_compile(self, *args, **kwargs)

    monkeypatch.setattr(jit.JITFunction, "_do_compile", counted)
    x = _inputs(name, dtype)
    o, ht = getattr(ops, name)(**x, output_final_state=True)
    torch.autograd.backward([o, ht], [torch.randn_like(o), torch.randn_like(ht)])
    torch.cuda.synchronize()
    assert compiles["dry"] > 0, "the dry run compiled nothing (the shape was not new, or it did not run)"
    assert compiles["real"] == 0, f"the real call compiled {compiles['real']} kernel(s) the dry run missed"
    for t in (o, ht, *(v.grad for v in x.values())):
        assert torch.isfinite(t).all()
