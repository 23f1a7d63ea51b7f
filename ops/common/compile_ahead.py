"""First call at a new shape: compile all of an op's kernels side by side, then run it.

An op decorated with @first_call runs once, at each new specialization, as a dry run: its forward (and, when an
input requires grad, its backward) on uninitialized tensors of the same shapes, with every Triton launch turned
into a warmup (the kernel is compiled, nothing runs) inside Triton's AsyncCompileMode, whose thread pool compiles
the kernels concurrently. The real call then finds them in Triton's cache. Triton's compiler releases the GIL for
most of its work: the DPLR chunk form's 10 kernels (bf16, K = V = 128, sm_90) compile in 8.5 s one after another
and in 5.3 s on 2 threads on a 2-core CPU.

The backward runs in autograd's device thread, so the dry run is process-wide: the warmup launches, the flag
`active()` and the compile pool hold in every thread while it lasts (one dry run at a time; real launches from
other threads meanwhile would be warmups too). A launch_fitting kernel (the deepest software pipeline that fits
shared memory) compiles its deepest candidate in the dry run; when the dry run's compiles are done, those over the
GPU's shared memory compile the next depth that can fit, in rounds, until one fits, and that depth is recorded for
the real launch: the same compiles as without this module, side by side. Only on CUDA tensors and outside the
interpreter.
On by default (the whole GPU suite passed with it: benchmarks/NOTES.md, visit 10); DELTACHECK_COMPILE_AHEAD=0
turns it off, DELTACHECK_COMPILE_THREADS sets the pool size (default: the CPU count, at most 16).
"""
import contextlib
import functools
import gc
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

ENABLED = os.environ.get("DELTACHECK_COMPILE_AHEAD", "1") != "0"
# Each compile job also builds its kernel's launcher (a C module per kernel signature that Triton compiles with the
# host C compiler at the kernel's first launch, one after another in the launching thread, when its cache has none).
# H100, DPLR chunk fwd+bwd from an empty cache (visit 18, benchmarks/first_call_trace.py): the last compile ends at
# 8.0 s of a 11.7 s first call. Built in the pool instead (visit 19, each in a fresh process and cache): 12.68 ->
# 7.82 s, the 11 launcher builds (3.6 s one after another after the last compile) now inside the compiles' span.
# DELTACHECK_COMPILE_LAUNCHERS=0 leaves them to Triton.
LAUNCHERS = os.environ.get("DELTACHECK_COMPILE_LAUNCHERS", "1") == "1"
THREADS = int(os.environ.get("DELTACHECK_COMPILE_THREADS", "0")) or min(16, os.cpu_count() or 1)
_SEEN = set()
_LOCK = threading.Lock()
_ACTIVE = threading.Event()  # set during a dry run, seen by every thread
_FITS = []  # the dry run's launch_fitting kernels: (launch(depth), compiled or pending kernel, depths, on_fit)


def active() -> bool:
    """True inside a dry run (launches are warmups; launch_fitting picks its depth once the compiles are done)."""
    return _ACTIVE.is_set()


class _InEveryThread:
    """Stands in for triton's `active_mode` ContextVar: the same AsyncCompileMode in every thread (a ContextVar
    set here is unset in autograd's backward thread, whose kernels would then compile one after another)."""

    def __init__(self, mode):
        self.mode = mode

    def get(self):
        return self.mode

    def set(self, value):
        pass


def fit_later(launch, stages, on_fit):
    """In a dry run: compile launch(stages[0]) now (in the pool); when the dry run ends, shallower depths for as
    long as the compiled kernel is over the GPU's shared memory; on_fit(depth) gets the first that fits."""
    _FITS.append((launch, launch(stages[0]), list(stages), on_fit))


def _max_shared() -> int:
    from triton.compiler.compiler import max_shared_mem
    from triton.runtime.driver import driver
    return max_shared_mem(driver.active.get_current_device())


def _settle_fits():
    """Rounds over the dry run's launch_fitting kernels: wait for each compile; one over the shared memory (Triton
    would refuse its launch) compiles the next depth whose buffers, scaled from this one, can fit."""
    pending, limit = list(_FITS), None
    _FITS.clear()
    while pending:
        later = []
        for launch, k, stages, on_fit in pending:
            c = k.result(ignore_errors=True) if hasattr(k, "result") else k
            if c is None:  # did not compile: the real launch reports it
                continue
            limit = _max_shared() if limit is None else limit
            s, rest, shared = stages[0], stages[1:], c.metadata.shared
            if shared <= limit:
                on_fit(s)
            elif rest:
                rest = [t for t in rest if t * shared <= s * limit] or rest[-1:]
                later.append((launch, launch(rest[0]), rest, on_fit))
        pending = later


def _with_launcher(compile_fn):
    """compile_fn, then its kernel's launcher built in the same (pool) thread; Triton caches the module, so the
    first launch finds it. A launcher that fails to build here is built (or fails) at that launch, as without."""
    def run():
        kernel = compile_fn()
        try:
            from triton.runtime.driver import driver
            driver.active.launcher_cls(kernel.src, kernel.metadata)
        except Exception:
            pass
        return kernel
    return run


@contextlib.contextmanager
def _warmups_only():
    import triton.runtime._async_compile as ac
    import triton.runtime.jit as jit

    run = jit.JITFunction.run

    def warmup_run(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    with _LOCK, ThreadPoolExecutor(THREADS) as pool:
        mode = ac.AsyncCompileMode(pool, ignore_errors=True)
        if LAUNCHERS:
            submit = mode.submit
            mode.submit = lambda key, compile_fn, finalize_fn: submit(key, _with_launcher(compile_fn), finalize_fn)
        context_var = ac.active_mode
        jit.JITFunction.run = warmup_run
        ac.active_mode = _InEveryThread(mode)
        _ACTIVE.set()
        try:
            yield
            _settle_fits()
            mode.__exit__(None, None, None)  # waits for every compile and puts the kernels in the JIT caches
        finally:
            _FITS.clear()
            _ACTIVE.clear()
            ac.active_mode = context_var
            jit.JITFunction.run = run


def _key(name, args, kwargs):
    """What Triton specializes on, coarsely: dtypes, the shapes' trailing dims, 1 / multiple-of-16 sizes, which
    inputs are None or require grad, and the non-tensor arguments. A key that misses only means a kernel
    compiles at its launch, as without this module."""
    def part(x):
        if isinstance(x, torch.Tensor):
            s = tuple(x.shape)
            return ("T", x.dtype, x.device.index, s[2:] if x.dim() >= 3 else (),
                    tuple(d == 1 or d % 16 == 0 for d in s), x.requires_grad)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        return type(x).__name__
    return (name, tuple(part(a) for a in args), tuple(sorted((k, part(v)) for k, v in kwargs.items())),
            torch.is_grad_enabled())


def _stand_in(x):
    """A floating-point input's uninitialized twin (same shape, dtype, device, requires_grad); others as they are
    (cu_seqlens is read on the host)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return torch.empty_like(x).requires_grad_(x.requires_grad)
    return x


def first_call(op):
    """Decorator of a public op: at a new specialization, compile its forward and backward kernels together."""
    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if ENABLED and not active():  # (checked first: a decode step is ~60 us, the wrapper must cost nothing)
            tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
            if tensors and all(x.is_cuda for x in tensors) and os.environ.get("TRITON_INTERPRET", "0") != "1":
                key = _key(op.__name__, args, kwargs)
                if key not in _SEEN:
                    _SEEN.add(key)
                    _dry_run(op, args, kwargs)
        return op(*args, **kwargs)
    return wrapper


def _dry_run(op, args, kwargs):
    a = [_stand_in(x) for x in args]
    kw = {k: _stand_in(v) for k, v in kwargs.items()}
    out = outs = None
    try:
        with _warmups_only():
            out = op(*a, **kw)
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    except Exception:  # the real call raises what is wrong (bad input) or compiles what the dry run missed
        pass
    # The dry run's tensors end up in reference cycles: on the H200 (bf16, B=8, T=4096, H=16, K=V=128) the DPLR
    # chunk's dry forward left 2.25 GiB and its dry fwd+bwd 7.0 GiB allocated until a gc.collect() freed them.
    del a, kw, out, outs
    gc.collect()
