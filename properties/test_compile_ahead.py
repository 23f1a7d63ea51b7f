"""The first call at a new shape compiles the op's forward and backward kernels in a dry run, side by side
(ops/common/compile_ahead.py): the real call, forward and backward, then compiles nothing itself."""
import os
import threading
import types

import pytest
import torch
import triton.runtime._async_compile as async_compile
import triton.runtime.jit as jit
from triton.runtime.errors import OutOfResources

import ops
from ops.common import compile_ahead
from ops.common import utils as U
from properties.strategies import ON_GPU

gpu_only = pytest.mark.skipif(not ON_GPU, reason="the dry run compiles for the GPU; the interpreter compiles nothing")

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


@gpu_only
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


def test_dry_run_holds_in_every_thread():
    """A dry run holds in every thread (autograd runs a CUDA backward in its own thread): there, too, active() is
    true and Triton sees the dry run's compile pool; after it, neither holds anywhere."""
    seen = {}

    def look(tag):
        seen[tag] = (compile_ahead.active(), async_compile.active_mode.get() is not None)

    with compile_ahead._warmups_only():
        worker = threading.Thread(target=look, args=("inside",))
        worker.start()
        worker.join()
    worker = threading.Thread(target=look, args=("after",))
    worker.start()
    worker.join()
    look("after, here")
    assert seen == {"inside": (True, True), "after": (False, False), "after, here": (False, False)}


class _Compiled:
    def __init__(self, shared):
        self.metadata = type("Metadata", (), dict(shared=shared))()


class _FakeKernel:
    """kernel[grid](..., num_stages=s) that records the depths launched; s stages take 100 KB of shared memory
    a block. Over the limit (232448 B, sm_90's) Triton refuses a launch (OutOfResources before anything runs),
    not a warmup, whose compiled kernel (metadata.shared) it returns, here at once or as a pending compile."""
    LIMIT = 232_448

    def __init__(self, pending=False):
        self.launched, self.pending = [], pending

    def __getitem__(self, grid):
        def launch(*args, num_stages, **kwargs):
            self.launched.append(num_stages)
            shared = 100_000 * num_stages
            if compile_ahead.active():
                c = _Compiled(shared)
                return type("Pending", (), dict(result=lambda self, ignore_errors=False: c))() if self.pending else c
            if shared > self.LIMIT:
                raise OutOfResources(shared, self.LIMIT, "shared memory")
            return num_stages
        return launch


@pytest.mark.parametrize("pending", [False, True])
def test_launch_fitting_steps_down_and_a_dry_run_compiles_only_what_fits(monkeypatch, pending):
    """Outside a dry run launch_fitting runs the deepest pipeline that is not refused, keeps that depth, and steps
    down when the kept one is refused after all. In a dry run it compiles the deepest depth and, once the dry
    run's compiles are done, the next depth that can fit for a kernel over the shared memory: the depths a real
    first call would compile, no more; the real launch then runs the kept depth, refused nowhere."""
    monkeypatch.setattr(U, "_FITTING_STAGES", {})
    monkeypatch.setattr(compile_ahead, "_max_shared", lambda: _FakeKernel.LIMIT)
    x = torch.ones(4)
    kernel = _FakeKernel(pending)
    with compile_ahead._warmups_only():
        assert U.launch_fitting(kernel, (1,), x, stages=(4, 3, 2, 1)) is None
        assert kernel.launched == [4]  # the shallower depths wait for this compile
    assert kernel.launched == [4, 2] and list(U._FITTING_STAGES.values()) == [2]  # 3 skipped: 3/4 x 400 KB > limit
    kernel.launched.clear()
    assert U.launch_fitting(kernel, (1,), x, stages=(4, 3, 2, 1)) == 2 and kernel.launched == [2]
    kernel.launched.clear()
    monkeypatch.setattr(U, "_FITTING_STAGES", {})
    assert U.launch_fitting(kernel, (1,), x, stages=(4, 3, 2, 1)) == 2 and kernel.launched == [4, 2]
    kernel.launched.clear()
    monkeypatch.setattr(_FakeKernel, "LIMIT", 150_000)  # the kept depth refused (another GPU): it steps down
    assert U.launch_fitting(kernel, (1,), x, stages=(4, 3, 2, 1)) == 1 and kernel.launched == [2, 1]


class _NamedKernel:
    """A kernel under a TUNED entry's name that records the settings each launch gets."""
    def __init__(self, module, name):
        self.fn = types.SimpleNamespace(__module__=module, __name__=name)
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, num_stages, num_warps=None, **kwargs):
            self.launches.append((num_warps, num_stages))
        return launch


@pytest.mark.parametrize("kernel", sorted(k for k, v in U.TUNED.items() if not v.get("half_inputs")))
def test_tuned_launches_apply_to_the_half_operand_path_only(kernel, monkeypatch):
    """A TUNED entry not marked half_inputs (measured on half-precision dot operands) sets the launch of that kernel
    where it takes half operands (OP float16 / bfloat16) and nowhere else: with float32 or float64 operands, also
    for half inputs whose tiles keep float32 operands, the kernel launches at its own settings."""
    import triton.language as tl
    monkeypatch.setattr(U, "_FITTING_STAGES", {})
    monkeypatch.setattr(U, "OVERRIDE", {})
    module, name = kernel.rsplit(".", 1)
    k = _NamedKernel(module, name)
    want = (U.TUNED[kernel]["num_warps"], U.TUNED[kernel]["num_stages"])
    half = torch.ones(4, dtype=torch.float16)
    for op in (tl.float16, tl.bfloat16):
        U.launch_fitting(k, (1,), half, OP=op, stages=(2, 1))
        assert k.launches[-1] == want, f"{kernel} with {op} operands launched at {k.launches[-1]}"
    for x, op in ((half, tl.float32), (torch.ones(4), tl.float32), (torch.ones(4, dtype=torch.float64), tl.float64)):
        U.launch_fitting(k, (1,), x, OP=op, stages=(2, 1))
        assert k.launches[-1] == (None, 2), f"{kernel} with {x.dtype} inputs, {op} operands: {k.launches[-1]}"



@pytest.mark.parametrize("kernel", sorted(U.DPLR_TUNED))
def test_tuned_launches_marked_half_inputs_follow_half_inputs(kernel, monkeypatch):
    """A TUNED entry marked half_inputs (the DPLR entries, on unless DELTACHECK_DPLR_TUNED=0; measured on bf16
    inputs) applies where any tensor argument is half precision, also behind a float32 first one (DPLR wy_bwd's G)
    and with float32 dot operands, and nowhere else."""
    import triton.language as tl
    monkeypatch.setattr(U, "_FITTING_STAGES", {})
    monkeypatch.setattr(U, "OVERRIDE", {})
    monkeypatch.setattr(U, "TUNED", {**U.TUNED, **U.DPLR_TUNED})
    k = _NamedKernel(*kernel.rsplit(".", 1))
    want = (U.DPLR_TUNED[kernel]["num_warps"], U.DPLR_TUNED[kernel]["num_stages"])
    f32, f64 = torch.ones(4), torch.ones(4, dtype=torch.float64)
    for half in (torch.float16, torch.bfloat16):
        U.launch_fitting(k, (1,), f32, torch.ones(4, dtype=half), None, stages=(2, 1))
        assert k.launches[-1] == want, f"{kernel} with {half} inputs launched at {k.launches[-1]}"
        U.launch_fitting(k, (1,), torch.ones(4, dtype=half), OP=tl.float32, stages=(2, 1))  # (half_inputs)
        assert k.launches[-1] == want, f"{kernel} with {half} inputs, float32 operands: {k.launches[-1]}"
    for args in ((f32, f32), (f64, None)):
        U.launch_fitting(k, (1,), *args, stages=(2, 1))
        assert k.launches[-1] == (None, 2), f"{kernel} with {[getattr(a, 'dtype', a) for a in args]}"



def test_state_pipeline_deepens_only_grids_of_one_program_per_sm(monkeypatch):
    """utils.STATE_PIPELINE gives chunk_h_bwd two pipeline stages (falling back to one) where its grid of
    V blocks x sequences x heads leaves the SMs one program each or fewer; elsewhere, or with the switch off, the
    launch keeps its own stages."""
    import triton

    import ops.delta_rule.chunk_h as chunk_h
    asked, grids = [], []
    monkeypatch.setattr(chunk_h, "launch_fitting", lambda *a, stages, **kw: asked.append(stages))
    B, T, H, K, V, C = 2, 40, 3, 32, 32, 64
    q, k, w, do, dv_local = (torch.randn(B, T, H, d) for d in (K, K, K, V, V))
    idx = U.chunk_index(None, B, T, C, q.device)
    scale = U.scale_arg(0.5, q.dtype, q.device)
    for enabled in (False, True):
        for few in (False, True):
            monkeypatch.setattr(U, "STATE_PIPELINE", enabled)
            monkeypatch.setattr(chunk_h, "few_programs", lambda n, device, _f=few: grids.append(n) or _f)
            chunk_h.chunk_h_bwd(q, k, w, do, dv_local, None, None, scale, idx.offsets, idx.chunk_offsets, idx.NC, C)
    own = asked[0]
    assert asked == [own, own, own, (2, 1)] and own != (2, 1), asked
    assert set(grids) == {B * H * triton.cdiv(V, chunk_h._blocks(K, V)[2])}, grids
    assert U.few_programs(1, torch.device("cpu")) is False  # off CUDA there are no SMs to leave idle


def test_switches_name_the_settings_a_record_depends_on(monkeypatch):
    """utils.switches() lists every DELTACHECK_* setting of the ops in the environment (benchmark records carry
    it) and none of the ones that only say where records go or what runs."""
    for k in [k for k in os.environ if k.startswith("DELTACHECK_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DELTACHECK_STATE_PIPELINE", "1")
    monkeypatch.setenv("DELTACHECK_HALF_OPERANDS", "wy_fwd")
    for k in U.NOT_SWITCHES:
        monkeypatch.setenv(k, "x")
    assert U.switches() == {"DELTACHECK_HALF_OPERANDS": "wy_fwd", "DELTACHECK_STATE_PIPELINE": "1"}
    from benchmarks.gpu_summary import machine_lines
    assert "switches: DELTACHECK_HALF_OPERANDS=wy_fwd, DELTACHECK_STATE_PIPELINE=1" in machine_lines(
        dict(switches=U.switches()))[-1]
    assert machine_lines(dict(switches={}))[-1].endswith("switches: none (the defaults)")


def test_dplr_tuned_off_keeps_wy_bwd_at_one_stage():
    """DELTACHECK_DPLR_TUNED=0 drops the DPLR launch choices but keeps DPLR wy_bwd at 1 stage: its half-operand path
    is GPU-tested there and at DPLR_TUNED's 3 stages only (fla issue 984: a WY backward at C = 64 on half operands
    miscompiles at 2-4 stages)."""
    import subprocess
    import sys
    code = "import ops.common.utils as U; print(sorted(k for k in U.TUNED if '.dplr.' in k))"
    out = {}
    for v in ("0", "1"):
        env = dict(os.environ, DELTACHECK_DPLR_TUNED=v)
        out[v] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    assert out["0"] == str(["ops.generalized_delta_rule.dplr.wy_fast.wy_bwd_kernel"]), out
    assert out["1"] == str(sorted(U.DPLR_TUNED)), out
    assert U.DPLR_TUNED["ops.generalized_delta_rule.dplr.wy_fast.wy_bwd_kernel"]["num_stages"] == 3


def test_launchers_build_in_the_compile_pool(monkeypatch):
    """With compile_ahead.LAUNCHERS (DELTACHECK_COMPILE_LAUNCHERS=1) each dry-run compile job also builds its
    kernel's launcher from the kernel's source and metadata, in the pool's thread, not the caller's; a launcher that
    fails to build still leaves the compiled kernel to the real launch. Off, the job only compiles."""
    import sys
    import threading
    import types

    import triton.runtime._async_compile as ac

    from ops.common import compile_ahead
    rd = sys.modules["triton.runtime.driver"]  # (the package's `driver` attribute is the DriverConfig)
    built = []

    def launcher(src, metadata):
        built.append((src, metadata, threading.current_thread() is threading.main_thread()))
        if src == "bad":
            raise RuntimeError("no compiler")
    monkeypatch.setattr(rd, "driver", types.SimpleNamespace(active=types.SimpleNamespace(launcher_cls=launcher)))
    for on in (True, False):
        built.clear()
        monkeypatch.setattr(compile_ahead, "LAUNCHERS", on)
        kernels = [types.SimpleNamespace(src=name, metadata=i) for i, name in enumerate(("a", "bad"))]
        done = []
        with compile_ahead._warmups_only():
            mode = ac.active_mode.get()
            futures = [mode.submit(k.src, lambda k=k: k, done.append) for k in kernels]
        assert [f.result() for f in futures] == kernels and done == kernels
        assert built == ([("a", 0, False), ("bad", 1, False)] if on else [])
