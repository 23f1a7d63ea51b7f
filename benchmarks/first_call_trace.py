"""Where a first call's seconds go: one form's first call at a point in this process, with the start and end of every
Triton compile and launcher build (seconds from the call's start) and the thread it ran on. Run it with an empty
Triton cache:

    TRITON_CACHE_DIR=$(mktemp -d) [DELTACHECK_COMPILE_LAUNCHERS=1] python3 -m benchmarks.first_call_trace \
        --form dplr.chunk [--point B=8,T=4096,H=16,K=128,V=128,dtype=bf16] [--mode fwd+bwd]

Prints one row per compile, earliest first (times from before the inputs are made), then the call's total and the
span the compiles cover; compiles that overlap ran side by side (ops.common.compile_ahead's pool), gaps are host
work between them. Needs CUDA.
"""
import argparse
import threading
import time

import triton.compiler as compiler

EVENTS = []  # (what, start, end, thread), perf_counter seconds


def _timed(fn, what):
    """fn, appending (what(src), start, end, thread) to EVENTS at each call; src is its first argument after self."""
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((what(args), t0, time.perf_counter(), threading.current_thread().name))
    return timed


def _name(src):
    return getattr(getattr(src, "fn", None), "__name__", type(src).__name__)


# a JITFunction takes triton.compiler.compile at its first launch (create_binder): patched before any launch
compiler.compile = _timed(compiler.compile, lambda args: _name(args[0]))


def _trace_launchers():
    """Each kernel's launcher build too (a C module per signature, compiled at the kernel's first launch when the
    cache has none), as "launcher <kernel>"."""
    import triton.backends.nvidia.driver as nv
    nv.CudaLauncher.__init__ = _timed(nv.CudaLauncher.__init__, lambda args: f"launcher {_name(args[1])}")


_trace_launchers()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--form", default="dplr.chunk")
    p.add_argument("--point", default="B=8,T=4096,H=16,K=128,V=128,dtype=bf16")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    a = p.parse_args(argv)
    import torch

    from benchmarks import harness
    from benchmarks.first_call import one
    t0 = time.perf_counter()
    first, second = one(a.form, harness.parse_point(a.point), a.mode, "cuda")
    print(f"{a.form} {a.mode}: first call {first:.2f} s, second {second * 1e3:.1f} ms; "
          f"{len(EVENTS)} compiles; torch {torch.__version__}")
    for name, s, e, th in sorted(EVENTS, key=lambda x: x[1]):
        print(f"  {s - t0:7.2f} -> {e - t0:7.2f} s  ({e - s:5.2f} s)  {name}  [{th}]")
    if EVENTS:
        print(f"compiles span {min(x[1] for x in EVENTS) - t0:.2f} .. {max(x[2] for x in EVENTS) - t0:.2f} s of "
              f"the {time.perf_counter() - t0:.2f} s from the inputs' making to the second call's end")


if __name__ == "__main__":
    main()
