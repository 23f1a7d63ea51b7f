"""DeltaFormer attention (erase-then-write on top of softmax attention) in Triton, forward and backward.

deltaformer_attn (parallel.py) = the solve u = (I + diag(beta) P)^-1 v (invcum.py) followed by causal softmax
attention over u (attention.py, also usable alone as causal_attention)."""
from ops.deltaformer.attention import causal_attention
from ops.deltaformer.invcum import invcum, invcum_adjoint
from ops.deltaformer.parallel import deltaformer_attn

__all__ = ["causal_attention", "deltaformer_attn", "invcum", "invcum_adjoint"]
