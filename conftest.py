"""Root pytest setup shared by properties/ and benchmarks/.

Without a GPU, Triton kernels run in the interpreter, which must be chosen before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DELTACHECK_POISON", "1")  # NaN-fill every op output buffer before its kernel runs
