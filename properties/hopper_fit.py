"""Do our kernels fit an H100 (sm_90)? Checked on a machine with no GPU.

Runs the public ops (forward and backward) on CPU tensors with every Triton launch intercepted: instead of
running, each launch is compiled for sm_90 (Triton's own compiler and the ptxas shipped in its wheel, no driver
needed) with exactly the launch's constexprs, argument types, num_warps and num_stages, and the compiled kernel's
shared-memory need is compared with the H100's 227 KiB per block (232448 bytes). A kernel over that limit is what a
GPU run reports as "OutOfResources: shared memory".

    python3 -m properties.hopper_fit [--dtypes fp16,bf16,fp32,fp64] [--shapes 256x256,60x100] [--chunks 64]

Kernels do not run, so outputs are uninitialized: nothing here checks values, only what compiles.
Must be imported before triton with TRITON_INTERPRET unset (it clears it).
"""
import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.int8: "i8"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

RESULTS = {}  # (kernel, constexprs, options) -> shared bytes
PTX = {}  # same keys -> the PTX, for register and spill counts (registers())
COMPILE_S = {}  # same keys -> seconds triton.compile took here (what bounds a first call's compile-ahead pool)


def _specialize(v, specialize=True):
    """(type, constant or None, 16-divisible) as Triton's launcher specializes an argument: pointers and ints
    divisible by 16 get tt.divisibility = 16 (what enables vectorized and asynchronous copies), ints equal to 1
    become constants."""
    if isinstance(v, torch.Tensor):
        return "*" + _TY[v.dtype], None, v.data_ptr() % 16 == 0
    if isinstance(v, bool):
        return "i1", None, False
    if isinstance(v, int):
        if specialize and v == 1:
            return "constexpr", 1, False
        return ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64"), None, specialize and v % 16 == 0
    if isinstance(v, float):
        return "fp32", None, False
    raise TypeError(f"cannot type argument {v!r}")


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    """JITFunction.run replacement: compile for sm_90 with this launch's arguments and record shared memory."""
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    bound = {p.name: p.default for p in self.params if p.has_default}
    bound.update(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    keep = set(self.do_not_specialize or ())
    for i, p in enumerate(self.params):
        v = bound[p.name]
        if p.is_constexpr or v is None:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, const, div16 = _specialize(v, specialize=i not in keep and p.name not in keep)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = const
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    key = (self.fn.__qualname__, tuple((self.params[k[0]].name, repr(v)) for k, v in constexprs.items()),
           tuple(sorted(signature.items())), tuple(sorted(attrs)), tuple(sorted(options.items())))
    if key not in RESULTS:
        src = ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs)
        t0 = time.perf_counter()
        compiled = triton.compile(src, target=SM90, options=options)
        COMPILE_S[key] = time.perf_counter() - t0
        RESULTS[key] = compiled.metadata.shared
        PTX[key] = compiled.asm["ptx"]
    if RESULTS[key] > SMEM_LIMIT:  # what the launch on the GPU raises, before anything runs
        raise OutOfResources(RESULTS[key], SMEM_LIMIT, "shared memory")
    return None


def registers(key):
    """(registers per thread, spill store bytes, spill load bytes) of a compiled kernel, from `ptxas -v` on its
    PTX (the ptxas in Triton's wheel; what a GPU would load). Spills go to local memory: on a GPU they turn a
    kernel's register tiles into memory traffic."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(PTX[key])
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (int(regs.group(1)) if regs else -1, *(tuple(map(int, spill.groups())) if spill else (-1, -1)))


def _allow_cpu_tensors():
    """The ops refuse CPU tensors unless interpreting: accept them here (nothing runs)."""
    import ops.common.utils as U
    original = U.check_device
    for name, mod in list(sys.modules.items()):
        if name.startswith("ops") and getattr(mod, "check_device", None) is original:
            mod.check_device = lambda name, x: None


def _inputs(op, B, T, H, K, V, dtype, gen):
    def r(*s, dt=dtype):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
    x = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V))
    if op in ("chunk", "fused_recurrent", "parallel"):
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    elif op.startswith(("iplr", "dplr")):
        x["a"], x["b"] = r(B, T, H, K), r(B, T, H, K)
        if op.startswith("dplr"):
            x["gk"] = (-torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)).float().requires_grad_()
    else:  # deltaformer
        x = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
                 beta=torch.rand(B, T, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_())
    return x


def exercise(op, dtype, K, V, chunk_size, T=80):
    """Forward and backward of one op (initial state and final-state gradient included where the op has them)."""
    import ops
    gen = torch.Generator().manual_seed(0)
    x = _inputs(op, 1, T, 2, K, V, dtype, gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(1, 2, K, V, generator=gen, dtype=torch.float64).to(acc).requires_grad_()
    chunked = dict(chunk_size=chunk_size)
    if op == "chunk":
        o, ht = ops.chunk_delta_rule(**x, initial_state=s0, output_final_state=True, **chunked)
        outs = [o, ht]
    elif op == "chunk_l2":
        x = _inputs("chunk", 1, T, 2, K, V, dtype, gen)
        o, ht = ops.chunk_delta_rule(**x, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                                     **chunked)
        outs = [o, ht]
    elif op == "fused_recurrent":
        o, ht = ops.fused_recurrent_delta_rule(**x, initial_state=s0, output_final_state=True)
        outs = [o, ht]
    elif op == "parallel":
        o, attn = ops.parallel_delta_rule(**x, initial_state=s0, output_attentions=True)
        outs = [o]
    elif op in ("iplr_chunk", "dplr_chunk"):
        f = ops.chunk_iplr_delta_rule if op == "iplr_chunk" else ops.chunk_dplr_delta_rule
        o, ht = f(**x, initial_state=s0, output_final_state=True, **chunked)
        outs = [o, ht]
    elif op in ("iplr_recurrent", "dplr_recurrent"):
        f = ops.fused_recurrent_iplr_delta_rule if op == "iplr_recurrent" else ops.fused_recurrent_dplr_delta_rule
        o, ht = f(**x, initial_state=s0, output_final_state=True)
        outs = [o, ht]
    elif op == "deltaformer":
        o = ops.deltaformer_attn(**x)
        outs = [o if isinstance(o, torch.Tensor) else o[0]]
    else:
        raise ValueError(op)
    outs = [t for t in outs if t is not None]
    torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])


OPS = ("chunk", "chunk_l2", "fused_recurrent", "parallel", "iplr_chunk", "dplr_chunk", "iplr_recurrent",
       "dplr_recurrent", "deltaformer")
DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32, fp64=torch.float64)


def audit(ops_=OPS, dtypes=("fp16", "fp32", "fp64"), shapes=((256, 256), (60, 100)), chunks=(64,), log=print):
    """Compile every launch of the given ops for sm_90 (a launch over the limit raises as on the GPU, so
    launch_fitting's fallbacks happen); return the (op, dtype, K, V, chunk, error) whose forward or backward fails."""
    failures = []
    jit.JITFunction.run = _compile_instead_of_launch
    import ops  # noqa: F401
    _allow_cpu_tensors()
    for op in ops_:
        for dt in dtypes:
            for K, V in shapes:
                for C in (chunks if "chunk" in op else chunks[:1]):
                    t0, n0 = time.time(), len(RESULTS)
                    try:
                        exercise(op, DTYPES[dt], K, V, C)
                        verdict = "fits"
                    except OutOfResources as e:
                        failures.append((op, dt, K, V, C, str(e)))
                        verdict = f"FAILS: {e}"
                    log(f"{op:16s} {dt} K={K:<3d} V={V:<3d} C={C:<3d} {len(RESULTS) - n0:3d} new kernels "
                        f"{time.time() - t0:6.1f}s  {verdict}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--dtypes", default="fp16,bf16,fp32,fp64")
    p.add_argument("--shapes", default="256x256,60x100,128x128,1x256,256x1")
    p.add_argument("--chunks", default="16,32,64")
    p.add_argument("--registers", action="store_true",
                   help="also list every kernel's registers per thread and spill bytes (ptxas -v)")
    a = p.parse_args(argv)
    shapes = [tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")]
    over = audit(a.ops.split(","), a.dtypes.split(","), shapes, [int(c) for c in a.chunks.split(",")])
    big = [(k, s) for k, s in RESULTS.items() if s > SMEM_LIMIT]
    print(f"{len(RESULTS)} kernel configurations compiled for sm_90, {len(big)} over {SMEM_LIMIT} bytes of shared "
          f"memory (refused launches, some retried with fewer stages); {len(over)} op runs fail:")
    for (name, cst, sig, attrs, opt), s in sorted(big, key=lambda t: -t[1]):
        print(f"  {s:7d} B  {name}  {dict(cst)}  {dict(opt)}")
    for f in over:
        print("  FAILS", *f)
    if a.registers:
        print("registers / thread, spill stores / loads (bytes), compile seconds here, per kernel configuration:")
        for key in sorted(PTX, key=lambda k: k[0]):
            r, st, ld = registers(key)
            cst = {n: v for n, v in key[1] if n in ("K", "V", "C", "BK", "BV", "BC", "USE_GK", "NK")}
            sig = dict(key[2])
            dt = next((sig[n] for n in ("k", "q", "a", "x", "qh", "kt", "ah", "v") if n in sig), "?").lstrip("*")
            print(f"  {r:4d} regs  {st:6d} / {ld:6d} B spilled  {COMPILE_S[key]:5.1f} s  {key[0]}  {dt}  {cst}  "
                  f"{dict(key[4])}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
