"""Every kernel launch fits an H100's shared memory, checked without a GPU (properties/hopper_fit.py compiles each
launch for sm_90 with Triton's compiler and the ptxas in its wheel)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the property tests' own launches are the check")
@pytest.mark.parametrize("ops,dtypes,shapes", [
    # the launches a GPU run once refused (OutOfResources): float64 K = 256 state tiles, float16 K = 60, V = 100
    ("dplr_chunk,iplr_chunk", "fp64,fp16", "256x256,60x100"),
    ("chunk,parallel,deltaformer", "fp64", "256x256"),
])
def test_every_launch_fits_h100_shared_memory(ops, dtypes, shapes):
    """Forward and backward at chunk size 64 and the largest head sizes: no launch needs more shared memory than
    sm_90 has (227 KiB), after launch_fitting's fewer-stage fallbacks."""
    cmd = [sys.executable, "-m", "properties.hopper_fit", "--ops", ops, "--dtypes", dtypes, "--shapes", shapes,
           "--chunks", "64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 op runs fail" in r.stdout
