"""pytest-benchmark suites for every registered form (ours, fla, causal SDPA) at a few shapes.

    python3 -m pytest benchmarks --benchmark-autosave              # save a run (.benchmarks/)
    python3 -m pytest benchmarks --benchmark-compare               # compare with the last saved run
    python3 -m pytest benchmarks --benchmark-compare=0001 --benchmark-group-by=group

Each benchmark's group is the op and the shape (and mode), so forms and peers at one shape sit in one table.
The timed function synchronises the GPU, so each round is the whole call. No timing thresholds: these suites
measure, they do not judge. Without CUDA each of our forms runs one tiny case in the Triton interpreter (fla,
whose kernels need a GPU, and SDPA are skipped with the reason), so the suite itself stays tested on CPU.
"""
import pytest
import torch

from benchmarks import flops as F
from benchmarks import registry as R
from benchmarks.harness import make_step, point_tag

CUDA = torch.cuda.is_available()
if CUDA:
    SHAPES = [dict(B=8, T=1024, H=16, K=128, V=128, dtype="bf16"),
              dict(B=2, T=4096, H=16, K=128, V=128, dtype="bf16"),
              dict(B=1, T=16384, H=16, K=128, V=128, dtype="bf16"),
              dict(B=64, T=1, H=16, K=128, V=128, dtype="bf16")]
    MODES = ["fwd", "fwd+bwd"]
else:
    SHAPES = [dict(B=1, T=16, H=1, K=16, V=16, dtype="fp32")]
    MODES = ["fwd"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=point_tag)
@pytest.mark.parametrize("form", R.FORMS, ids=lambda f: f.name)
def test_bench(benchmark, form, shape, mode):
    """Time one call (mode fwd) or one call and its backward (fwd+bwd) of `form` at `shape`."""
    if not CUDA and form.provider != "ours":
        pytest.skip(f"{form.label}: only our Triton forms run on CPU (in the interpreter)")
    ok, why = R.availability(form)
    if not ok:
        pytest.skip(why)
    dt = R.DTYPES[shape["dtype"]]
    if form.dtypes and dt not in form.dtypes:
        pytest.skip(f"{form.label} does not support {dt}")
    if form.max_T and shape["T"] > form.max_T:
        pytest.skip(f"T={shape['T']} above {form.label}'s cap {form.max_T}")
    B, T, H, K, V = (shape[n] for n in "BTHKV")
    x = R.FAMILIES[form.family].make_inputs(B, T, H, K, V, dt, "cuda" if CUDA else "cpu")
    if form.adapt_inputs is not None:
        x = form.adapt_inputs(x)
    step, _ = make_step(form, form.load(), x, mode)

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    try:  # forward-only peers (fla's IPLR chunk, DPLR fused recurrent) raise in backward: found by trying
        run()
    except NotImplementedError as e:
        pytest.skip(f"unsupported: {type(e).__name__}: {str(e).strip()[:200]}")

    fam = "delta_rule" if form.family == "softmax_attention" else form.family  # SDPA: the delta rule's baseline
    benchmark.group = f"{fam} {point_tag(shape)} {mode}"
    benchmark.extra_info.update(form=form.name, provider=form.provider, tokens=B * T,
                                flops=F.flops(form.flops_model, "fwd+bwd" if mode == "fwd+bwd" else "fwd",
                                              B, T, H, K, V))
    if CUDA:
        benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
    else:
        benchmark.pedantic(run, warmup_rounds=0, rounds=1, iterations=1)
