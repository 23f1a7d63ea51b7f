"""The Triton interpreter's tl.dot rounded as the GPU's tensor cores round it.

The interpreter computes every float32 tl.dot exactly (numpy float32 matmul), whatever its input_precision. On the
GPU (sm_80 / sm_90) an input_precision="tf32" dot feeds float32 bits to the tensor cores, which drop the low 13
mantissa bits: each operand x becomes trunc_tf32(x), a relative error up to 2^-10. "tf32x3" splits each operand
as x = big + small, big = rna_tf32(x), small = trunc_tf32(x - big), and sums big*big' + big*small' + small*big'
(Triton's F32DotTC pass), which leaves an error near float32's. `install()` makes the interpreter do the same, so
that a CPU run sees the rounding the GPU's products have (a GPU-only fp16 failure of the tf32 products, visit 13,
is reproduced on the CPU to its third digit this way).
"""
import numpy as np

_MASK = np.uint32(0xFFFFE000)  # sign, exponent and the 10 mantissa bits tf32 keeps


def trunc_tf32(x: np.ndarray) -> np.ndarray:
    """x (float32) with its 13 low mantissa bits cleared: what the tensor cores read of a float32 operand."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & _MASK).view(np.float32)


def rna_tf32(x: np.ndarray) -> np.ndarray:
    """x (float32) rounded to the nearest tf32, ties away from zero (PTX cvt.rna.tf32.f32)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x1000)) & _MASK).view(np.float32)


def tf32_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b as a tf32 tensor-core dot computes it (float32 accumulation)."""
    return np.matmul(trunc_tf32(a), trunc_tf32(b), dtype=np.float32)


def tf32x3_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b as Triton's tf32x3 computes it: three tf32 dots of the operands' big and small parts."""
    a_big, b_big = rna_tf32(a), rna_tf32(b)
    a_small, b_small = a.astype(np.float32) - a_big, b.astype(np.float32) - b_big
    return tf32_matmul(a_small, b_big) + tf32_matmul(a_big, b_small) + tf32_matmul(a_big, b_big)


def install():
    """Patch the interpreter's dot so float32 operands with tf32 / tf32x3 precision round as on the GPU."""
    import triton.runtime.interpreter as interp
    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_tf32_rounding", False):
        return
    exact = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        mode = str(input_precision).rsplit(".", 1)[-1].upper()
        if a.data.dtype == np.float32 and b.data.dtype == np.float32 and mode in ("TF32", "TF32X3"):
            product = (tf32_matmul if mode == "TF32" else tf32x3_matmul)(a.data, b.data)
            return interp.TensorHandle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return exact(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._tf32_rounding = True
    builder.create_dot = create_dot
