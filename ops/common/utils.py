"""Shared host-side helpers for every op: input validation, output allocation, dtype rules, varlen chunk maps."""
import contextlib
import os
from typing import NamedTuple

import torch
import triton
from triton.runtime.errors import OutOfResources

from ops.common import compile_ahead

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_SIZE = 256

# When set (tests do), every output buffer an op allocates is filled with NaN before its kernel runs, so an
# element a kernel fails to write shows up as NaN instead of a plausible stale value.
POISON_OUTPUTS = os.environ.get("DELTACHECK_POISON", "0") == "1"


def set_poison(flag: bool) -> None:
    global POISON_OUTPUTS
    POISON_OUTPUTS = bool(flag)


def new_empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialized, or NaN-poisoned when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / intermediate / state dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision. Operands are upcast to the accumulation dtype inside kernels (except where
    operand_type gives a kernel half operands); float32 and float64 inputs get exact products ("ieee": no silent
    tf32). Half inputs' float32 operands: the tensor cores truncate a tf32 operand to 10 mantissa bits (relative
    error up to 2^-10), finer than bf16's rounding (2^-8) but coarser than fp16's (2^-11), so bf16 takes tf32 and
    fp16 exact products; with tf32 an fp16 initial-state gradient at K = 1, where the products cancel, erred 3.7x
    its bound (visit 13), and tf32x3 faulted (an illegal address) in an fp16 IPLR run on the same visit."""
    return "tf32" if dtype == torch.bfloat16 else "ieee"


# Half-precision tl.dot operands in the delta rule's chunk kernels: for float16 / bfloat16 inputs, the kernels named
# here round their dot operands to the input dtype and still accumulate in float32 (the tensor cores' half rate is
# twice tf32's, and the operands take half the shared memory and registers). DELTACHECK_HALF_OPERANDS is a
# comma-separated subset of HALF_KERNELS, 1 for all of them (the default) or 0 for none (tf32 products of float32
# operands). wy_bwd's half path launches as TUNED below says (4 warps, 1 stage): fla's WY backward miscompiles on
# Hopper at C = 64 with half operands on 4 warps and 2-4 stages (fla issue 984, fixed there by 2 warps).
HALF_KERNELS = ("wy_fwd", "chunk_h_fwd", "chunk_o_fwd", "chunk_dv_local", "chunk_h_bwd", "chunk_o_bwd", "wy_bwd")
# The DPLR / IPLR chunk kernels under the same rule. DELTACHECK_DPLR_HALF_OPERANDS: all (the default) names
# DPLR_HALF_KERNELS and DPLR_HALF_CANDIDATES, 1 the first only, 0 none. H100 at the point: GPU visit 16, the
# chunk_o kernels: chunk_o_fwd 1.23 -> 0.71 ms, chunk_o_bwd_local 0.76 -> 0.57, chunk_o_bwd_state (8 warps) 1.77 ->
# 1.66; visit 17, the candidates (with DIAG_DOT and DPLR_TUNED): wy_fwd 1.15 -> 0.99, wy_bwd 1.76 -> 1.09,
# chunk_h_bwd 2.87 -> 2.37 (chunk_h_fwd 0.94 -> 0.98 with DPLR_TUNED's 1 stage). dplr/wy_fast.py keeps the inverse
# X in the accumulation dtype and rounds its products' operands; dplr/chunk_h.py keeps the state in float32
# registers as [64, 64] tiles and rounds the decayed Bt, Kt, Qh, the state tiles and W, dW as dot operands.
DPLR_HALF_KERNELS = ("dplr_chunk_o_fwd", "dplr_chunk_o_bwd_local", "dplr_chunk_o_bwd_state")
DPLR_HALF_CANDIDATES = ("dplr_wy_fwd", "dplr_wy_bwd", "dplr_chunk_h_fwd", "dplr_chunk_h_bwd")


def half_kernels(spec: str) -> frozenset:
    """The kernels a DELTACHECK_HALF_OPERANDS value names ("1": all of HALF_KERNELS)."""
    names = {n.strip() for n in spec.split(",") if n.strip() and n.strip() != "0"}
    if "1" in names:
        return frozenset(HALF_KERNELS)
    known = HALF_KERNELS + DPLR_HALF_KERNELS + DPLR_HALF_CANDIDATES
    unknown = names - set(known)
    if unknown:
        raise ValueError(f"DELTACHECK_HALF_OPERANDS names unknown kernels {sorted(unknown)}; expected a subset of "
                         f"{known} or 1")
    return frozenset(names)


def dplr_half_kernels(spec: str) -> frozenset:
    """The DPLR kernels a DELTACHECK_DPLR_HALF_OPERANDS value names: 0 none, 1 DPLR_HALF_KERNELS, all with the
    candidates."""
    sets = {"0": (), "1": DPLR_HALF_KERNELS, "all": DPLR_HALF_KERNELS + DPLR_HALF_CANDIDATES}
    if spec not in sets:
        raise ValueError(f"DELTACHECK_DPLR_HALF_OPERANDS must be 0, 1 or all, got {spec!r}")
    return frozenset(sets[spec])


HALF_OPERANDS = half_kernels(os.environ.get("DELTACHECK_HALF_OPERANDS", "1")) | dplr_half_kernels(
    os.environ.get("DELTACHECK_DPLR_HALF_OPERANDS", "all"))


def operand_type(kernel: str, dtype: torch.dtype, *tiles: int):
    """Triton dtype of `kernel`'s tl.dot operands: the input's half dtype when HALF_OPERANDS names the kernel and
    its tiles (chunk, K and V blocks) are all equal and at least 32 wide; else the accumulation type. Every GPU
    failure of the first half-operand kernels had a 16-wide tile (benchmarks/NOTES.md, visit 3; at K = 1 rounding U
    or v_new to half is also amplified by the cancellation in K^T U), and every one of this version's had a
    64-wide chunk with a 32-wide V block: a half product of a dot result with N = 32 after one with N = 64 (wy_fwd's
    T V, chunk_o_fwd's (Q K^T * M) v_new, chunk_dv_local's (K Q^T) dO) came out wrong or faulted (visit 10)."""
    import triton.language as tl
    if dtype in (torch.float16, torch.bfloat16) and kernel in HALF_OPERANDS and min(tiles) >= 32 \
            and len(set(tiles)) == 1:
        op = tl.float16 if dtype == torch.float16 else tl.bfloat16
    else:
        op = tl_acc(dtype)
    LAST_OPERANDS[kernel] = (op, tiles)
    return op


LAST_OPERANDS = {}  # kernel -> (operand type, tiles) of its last launch (tests check the half path is taken)


def operand_storage(op) -> torch.dtype:
    """Storage dtype of an intermediate that later kernels read only as tl.dot operands, written by a kernel whose
    operands are `op` (W, h, v_new, dh): op itself, since rounding it for storage is the rounding its dot operands
    get anyway, and half storage halves those tensors' bytes (h and dh are [NC, H, K, V])."""
    import triton.language as tl
    return {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float64: torch.float64}.get(op, torch.float32)


def read_storage(dtype: torch.dtype, *readers) -> torch.dtype:
    """Storage dtype of an intermediate that its readers (their operand types) use only as tl.dot operands (dW,
    dv_new): their one shared operand type, so that storing it rounded changes nothing they compute; the
    accumulation dtype where they differ."""
    return operand_storage(readers[0]) if len(set(readers)) == 1 else acc_dtype(dtype)


# Intermediates a later kernel adds to rather than multiplies (U, dv_local, the partial dk) are stored in the half
# dot-operand type of the kernel that writes them (fla stores them in the input dtype): one more rounding of each,
# against half their bytes. DELTACHECK_HALF_STORAGE=0 keeps them in the accumulation dtype.
HALF_STORAGE = os.environ.get("DELTACHECK_HALF_STORAGE", "1") == "1"


def sum_storage(op) -> torch.dtype:
    """Storage dtype of such an intermediate written by a kernel whose dot operands are `op`."""
    import triton.language as tl
    if HALF_STORAGE or op not in (tl.float16, tl.bfloat16):
        return operand_storage(op)
    return torch.float32


# The DPLR / IPLR chunk form's intermediates stored by their readers' operand types (dplr/chunk.py storage()):
# those read only as dot operands (A_qk, A_qb, A_ak, X, Wm, W, dW, dWm) compute the same stored rounded
# (read_storage), those a reader also adds or multiplies elementwise (U, h, dh, dW_loc, dV_loc, dV) take one more
# rounding each under HALF_STORAGE (sum_storage), as fla stores them in the input dtype.
# DELTACHECK_DPLR_HALF_STORAGE=0 keeps every one in the accumulation dtype.
DPLR_HALF_STORAGE = os.environ.get("DELTACHECK_DPLR_HALF_STORAGE", "1") == "1"


# Sequential state passes with at most one program per SM (small B * H, long T) are latency-bound: a deeper software
# pipeline there prefetches the next chunk's tiles (chunk_h_bwd at B=2, T=16384, H=16: 1.38 -> 0.78 ms at 2 stages
# on an H200), where with more programs one stage is faster (two programs share an SM). With the two switches below,
# delta chunk fwd+bwd at B=2, T=16384 went 3.72 -> 2.92 ms (visit 13). DELTACHECK_STATE_PIPELINE=0 turns it off.
STATE_PIPELINE = os.environ.get("DELTACHECK_STATE_PIPELINE", "1") == "1"

# The state passes' per-chunk products W h (chunk_h_fwd) and K dh (chunk_h_bwd) summed from zero, U / dv_local added
# after them, as fla's kernels order it: the dots need not wait for that load (with one pipeline stage they did).
# DELTACHECK_STATE_DOT_FIRST=0 adds them first (the accumulator starts as the loaded term).
STATE_DOT_FIRST = os.environ.get("DELTACHECK_STATE_DOT_FIRST", "1") == "1"

# chunk_o_bwd's dS^T Q as (Q^T dS)^T with the kernel's operand type (half on the half path) instead of float32
# operands: ptxas (sm_90, bf16, K = V = 128, 4 warps, 2 stages) 28 -> 24 wgmma, 64 -> 28 shared stores. The
# transposed operand is a loaded tile and the dot result is transposed after the product, not fed to another dot
# (fla PR 826's Hopper miscompile). DELTACHECK_QT_DS=0 takes float32 operands for it.
QT_DS = os.environ.get("DELTACHECK_QT_DS", "1") == "1"

# The delta chunk's per-chunk output and dv_local computed inside the state passes: chunk_h_fwd also forms
# O = scale (Q h_n + (Q K^T * M) v_new) from the state and v_new it holds (no chunk_o_fwd, which re-reads h, v_new,
# Q and K) where its grid has more programs than the GPU has SMs, and chunk_h_bwd forms dv_local =
# scale (K Q^T * M^T) dO from the Q, K and dO tiles it loads anyway (no chunk_dv_local, no dv_local round trip).
# H100, bf16, B=8, T=4096, H=16, K=V=128: fwd 1.000 -> 0.898 ms, fwd+bwd 2.887 -> 2.594 (benchmarks/NOTES.md, visit
# 14). With one program per SM or fewer (B=2, T=16384) the longer chunk step is on the critical path (fwd 1.098 ->
# 1.253), so there o keeps its own kernel. DELTACHECK_FUSED_STATE=0 turns both off.
FUSED_STATE = os.environ.get("DELTACHECK_FUSED_STATE", "1") == "1"

# The forward state pass with one program per SM or fewer splits V in 32-wide blocks: twice the programs on the
# latency-bound chain of chunks (chunk_h_fwd at B=2, T=16384 on an H200: 0.391 -> 0.299 ms, visit 12; at the point,
# with two programs an SM, it was slower: 0.213 -> 0.294). DELTACHECK_STATE_SPLIT_V=0 keeps 64-wide blocks.
STATE_SPLIT_V = os.environ.get("DELTACHECK_STATE_SPLIT_V", "1") == "1"


def few_programs(n_programs: int, device) -> bool:
    """Whether a grid of n_programs leaves the GPU's SMs one program each or fewer (False off CUDA)."""
    if device.type != "cuda":
        return False
    return n_programs <= torch.cuda.get_device_properties(device).multi_processor_count


# DELTACHECK_* variables that say where records go or what runs, not what the ops compute or how they launch
NOT_SWITCHES = ("DELTACHECK_COMMIT", "DELTACHECK_RECORD", "DELTACHECK_PROFILE", "DELTACHECK_IMPLS",
                "DELTACHECK_NOT_REPORTED_IN")


def switches() -> dict:
    """This process's DELTACHECK_* settings of the ops (half operands, storage, the switches that wait for a GPU
    suite, ...), for benchmark records: a time measured with one on says so."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("DELTACHECK_") and k not in NOT_SWITCHES}


def block_size(n: int, minimum: int = 16) -> int:
    """Power-of-two tile covering n (at least 16: tl.dot's smallest dimension)."""
    return max(minimum, triton.next_power_of_2(n))


def quadratic_block_rows(K: int, V: int) -> int:
    """Default rows per block C of the quadratic forms (parallel delta rule, DeltaFormer): their [C, C] blocks
    and [C, <=64] K / V tiles, 64 rows unless a head size needs a tile over 128 columns, then 32."""
    return 64 if max(block_size(K), block_size(V)) <= 128 else 32


def check_device(name: str, x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} is on {x.device}; Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
        "set before triton is imported, which runs them in the slow interpreter)")


def check_tensor(name, x, ndim=None, shape=None, device=None, dtype=None, floating=True):
    """Raise a clear TypeError/ValueError naming `name` when x is not what is expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of float16, bfloat16, float32, float64")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {dtype}; all inputs must share one dtype")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; all inputs must be on one device")
    check_device(name, x)


def check_head_size(name: str, n: int) -> None:
    if not 1 <= n <= MAX_HEAD_SIZE:
        raise ValueError(f"{name} head size {n} is unsupported: expected 1 <= size <= {MAX_HEAD_SIZE}")


def check_cu_seqlens(cu_seqlens, B: int, T: int, device) -> int:
    """Validate packed-sequence offsets; return the number of sequences N."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and needs batch size 1, got B={B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T}, got {cu[-1]}")
    if any(e < s for s, e in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    return len(cu) - 1


def check_qkv(q, k, v):
    """q, k [B, T, H, K] and v [B, T, H, V], one dtype and device. Returns (B, T, H, K, V)."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, shape=q.shape, device=q.device, dtype=q.dtype)
    check_tensor("v", v, ndim=4, device=q.device, dtype=q.dtype)
    B, T, H, K = q.shape
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    check_head_size("q/k", K)
    check_head_size("v", v.shape[-1])
    return B, T, H, K, v.shape[-1]


def check_state(initial_state, N, H, K, V, device):
    if initial_state is None:
        return
    check_tensor("initial_state", initial_state, ndim=4, shape=(N, H, K, V), device=device)


def sequence_offsets(cu_seqlens, B: int, T: int, device) -> torch.Tensor:
    """int32 [N + 1] start offsets of each sequence in the flattened [B*T] token axis (no host sync)."""
    if cu_seqlens is None:
        return torch.arange(B + 1, dtype=torch.int32, device=device) * T
    return cu_seqlens.to(device=device, dtype=torch.int32)


class ChunkIndex(NamedTuple):
    """Where every chunk of every sequence lies. Sequence n is tokens offsets[n] .. offsets[n+1] of the flat B*T
    axis; its chunks are rows chunk_offsets[n] .. chunk_offsets[n+1] of cmap, each row (n, j) its j-th chunk."""
    offsets: torch.Tensor        # int32 [N + 1]
    cmap: torch.Tensor           # int32 [NC, 2]
    chunk_offsets: torch.Tensor  # int32 [N + 1]
    NC: int


_FIXED_INDEX = {}  # (B, T, chunk_size, device) -> ChunkIndex of a fixed-length batch


def chunk_index(cu_seqlens, B: int, T: int, chunk_size: int, device) -> ChunkIndex:
    """The ChunkIndex of a batch, built on the host: a fixed-length batch's is cached per shape (no device work
    and no sync after the first call); a packed batch reads cu_seqlens once (one sync, as validation does)."""
    key = (B, T, chunk_size, str(device))
    if cu_seqlens is None and key in _FIXED_INDEX:
        return _FIXED_INDEX[key]
    bounds = [n * T for n in range(B + 1)] if cu_seqlens is None else cu_seqlens.tolist()
    lens = torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
    counts = (lens + chunk_size - 1) // chunk_size
    chunk_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    seq = torch.repeat_interleave(torch.arange(len(lens)), counts)
    cmap = torch.stack([seq, torch.arange(len(seq)) - chunk_offsets[seq]], 1)
    as_dev = lambda x: x.to(torch.int32).contiguous().to(device)  # noqa: E731
    index = ChunkIndex(as_dev(torch.tensor(bounds)), as_dev(cmap), as_dev(chunk_offsets), len(seq))
    if cu_seqlens is None:
        if len(_FIXED_INDEX) > 64:
            _FIXED_INDEX.clear()
        _FIXED_INDEX[key] = index
    return index


def default_scale(scale, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    return float(scale)


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation type (tl.float64 for float64 inputs, tl.float32 otherwise)."""
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def scale_arg(scale: float, dtype: torch.dtype, device) -> torch.Tensor:
    """scale as a one-element tensor of the accumulation dtype: Triton passes a Python float to a GPU kernel as
    float32, which would round the float64 path's scale (the interpreter keeps float64, so CPU tests can't see it)."""
    return torch.full((1,), scale, dtype=acc_dtype(dtype), device=device)


def on_device(device):
    """Launch kernels on `device` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Shared memory that software pipelining may fill with in-flight loads (H100/H200: 227 KiB per block in all;
# the rest is left for the dot operands' layout conversions).
PIPELINE_SMEM = 96 * 1024


def pipeline_stages(stage_bytes: int) -> int:
    """num_stages for a loop whose iteration loads stage_bytes: 2 where two copies fit the budget, else 1."""
    return 2 if 2 * stage_bytes <= PIPELINE_SMEM else 1


_FITTING_STAGES = {}  # (kernel, constexprs and argument dtypes) -> num_stages that fit

# Launch settings measured per kernel on a Hopper GPU (benchmarks/tune_launch.py; half-precision inputs, the
# point B=8, T=4096, H=16, K=V=128): qualified kernel name (e.g. "ops.delta_rule.wy_fast.wy_fwd_kernel") ->
# dict(num_warps=, num_stages=). They apply to the half-precision path (half dot operands, or half inputs for a
# kernel without an operand-type argument); float32 and float64 tiles are twice and four times the bytes and keep
# each op's defaults.
# The stages are a ceiling: launch_fitting still steps down where a shape's pipeline does not fit. The entries are
# the delta chunk kernels' fastest variants with half operands (H200, benchmarks/NOTES.md "GPU visit 11";
# reports/data/h200/visit11/tune-*.json); the GPU's delta chunk tests in fp16 / bf16 passed with exactly these.
# Kernels not listed (chunk_o_fwd) were fastest at their defaults. chunk_h_bwd with dv_local inside it (FUSED_STATE):
# 2 stages, 0.501 -> 0.437 ms on an H100 (visit 14, reports/data/h100-80gb-hbm3/visit14/tune-*.json); its 2-stage
# launch is also what STATE_PIPELINE gives every small grid, the GPU tests' included.
TUNED = {
    "ops.delta_rule.wy_fast.wy_fwd_kernel": dict(num_warps=2, num_stages=1),
    "ops.delta_rule.wy_fast.wy_bwd_kernel": dict(num_warps=4, num_stages=1),
    "ops.delta_rule.chunk_h.chunk_h_fwd_kernel": dict(num_warps=4, num_stages=3),
    "ops.delta_rule.chunk_o.chunk_dv_local_kernel": dict(num_warps=2, num_stages=3),
    "ops.delta_rule.chunk_o.chunk_o_bwd_kernel": dict(num_warps=4, num_stages=2),
    "ops.delta_rule.chunk_h.chunk_h_bwd_kernel": dict(num_warps=4, num_stages=2),
}
# DPLR / IPLR (H100 at the point, bf16): the fastest launch of each kernel where it beat the default by more than
# noise, from `tune_launch --warps 2,4,8 --stages 1,2,3` (visit 16 for chunk_o_fwd; visit 18 on the square state
# tiles and half operands, reports/data/h100-80gb-hbm3/visit18/tune-*.json: chunk_h_bwd 2.375 -> 1.629 (8 warps ->
# 4, 2 stages), chunk_o_bwd_state 1.676 -> 1.461 (8 -> 4, 2 stages); visit 19 on half storage and chunk_A's scaled
# operands, visit19/tune-*.json, ms: chunk_A_fwd 1.497 -> 1.304 (2 warps, 2 stages -> 4, 3), chunk_h_fwd 0.493 ->
# 0.427 (3 stages), wy_bwd 0.885 -> 0.768 (3 stages; its gradients bit for bit those of 1 stage, the stage count
# fla issue 984 saw miscompile at is held by the GPU suite). They apply to half inputs whatever the operands
# (half_inputs). On unless DELTACHECK_DPLR_TUNED=0.
DPLR_TUNED = {
    "ops.generalized_delta_rule.dplr.chunk_h.chunk_h_fwd_kernel": dict(num_warps=4, num_stages=3, half_inputs=True),
    "ops.generalized_delta_rule.dplr.chunk_h.chunk_h_bwd_kernel": dict(num_warps=4, num_stages=2, half_inputs=True),
    "ops.generalized_delta_rule.dplr.chunk_o.chunk_o_fwd_kernel": dict(num_warps=4, num_stages=1, half_inputs=True),
    "ops.generalized_delta_rule.dplr.chunk_o.chunk_o_bwd_state_kernel": dict(num_warps=4, num_stages=2,
                                                                            half_inputs=True),
    "ops.generalized_delta_rule.dplr.chunk_A.chunk_A_fwd_kernel": dict(num_warps=4, num_stages=3, half_inputs=True),
    "ops.generalized_delta_rule.dplr.wy_fast.wy_fwd_kernel": dict(num_warps=2, num_stages=1, half_inputs=True),
    "ops.generalized_delta_rule.dplr.wy_fast.wy_bwd_kernel": dict(num_warps=4, num_stages=3, half_inputs=True),
}
if os.environ.get("DELTACHECK_DPLR_TUNED", "1") == "1":
    TUNED.update(DPLR_TUNED)
else:  # wy_bwd keeps the 1 stage its half path was GPU-tested at before visit 19 (fla issue 984: 2-4 stages can
    # miscompile a WY backward on Hopper; its 3 stages are GPU-tested only as DPLR_TUNED gives them)
    _wy_bwd = "ops.generalized_delta_rule.dplr.wy_fast.wy_bwd_kernel"
    TUNED[_wy_bwd] = dict(DPLR_TUNED[_wy_bwd], num_stages=1)

# Tuning only: settings every launch_fitting launch takes instead (benchmarks/tune_launch.py sets it), and the
# settings each kernel last ran with.
OVERRIDE = {}
LAST_LAUNCH = {}


def _kernel_name(kernel) -> str:
    """module.function: kernel names alone repeat across ops (the delta rule's and DPLR's wy_fwd_kernel)."""
    fn = getattr(kernel, "fn", kernel)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', str(kernel))}"


def _half(args, kwargs, by_inputs=False) -> bool:
    """Whether a launch runs the half-precision path TUNED was measured on: half dot operands (the OP argument)
    where the kernel takes one and its entry is not marked half_inputs, else half inputs (any half tensor argument:
    a kernel's first may be an accumulation-dtype intermediate, as DPLR wy_bwd's G)."""
    if "OP" in kwargs and not by_inputs:
        import triton.language as tl
        return kwargs["OP"] in (tl.float16, tl.bfloat16)
    return any(isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in args)


def launch_fitting(kernel, grid, *args, stages=(3, 2, 1), num_warps=None, **kwargs):
    """kernel[grid](*args, **kwargs) with the deepest software pipeline that fits the GPU's shared memory: the
    first num_stages of `stages` whose compiled kernel fits (Triton refuses a launch that does not, before
    anything runs, with OutOfResources; counts whose shared memory, scaled from the refused one, cannot fit
    are not compiled). The choice is kept per kernel, constexprs and argument dtypes.
    A TUNED entry (half-precision path, _half) sets num_warps and caps the stages; OVERRIDE replaces both."""
    name = _kernel_name(kernel)
    entry = TUNED.get(name)
    cfg = OVERRIDE or (entry if entry and _half(args, kwargs, entry.get("half_inputs", False)) else None)
    if cfg:
        num_warps = cfg.get("num_warps", num_warps)
        if "num_stages" in cfg:
            stages = tuple(range(cfg["num_stages"], 0, -1))
    warps = {} if num_warps is None else dict(num_warps=num_warps)
    key = (kernel, num_warps, stages, tuple((k, getattr(v, "dtype", v)) for k, v in kwargs.items()),
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    if compile_ahead.active():  # a dry run: compile now, choose the depth when the dry run's compiles are done
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

        def launch(s):  # (later rounds run in the dry run's own thread: on this launch's device)
            with on_device(dev):
                return kernel[grid](*args, num_stages=s, **warps, **kwargs)
        compile_ahead.fit_later(launch, stages, lambda s: _FITTING_STAGES.__setitem__(key, s))
        return None
    # the recorded depth first; the shallower ones stay behind it in case a launch is refused after all
    tried = [t for t in stages if t <= _FITTING_STAGES[key]] if key in _FITTING_STAGES else list(stages)
    while tried:
        s = tried.pop(0)
        try:
            out = kernel[grid](*args, num_stages=s, **warps, **kwargs)
        except OutOfResources as e:
            if not tried:
                raise
            # pipeline buffers grow about linearly with the stages: skip the counts that cannot fit either
            # (each refused try is a whole compile; DPLR chunk_h_bwd at K = 128 needs 386 KB at 3 stages)
            if e.name == "shared memory" and e.required > e.limit:
                fit = [t for t in tried if t * e.required <= s * e.limit]
                tried = fit or tried[-1:]
            continue
        _FITTING_STAGES[key] = s
        if OVERRIDE:
            LAST_LAUNCH[name] = dict(num_warps=num_warps, num_stages=s)
        return out
