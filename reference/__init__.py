"""float64 references for the delta-rule family. Short and obviously right; speed never enters here.

Layout (as fla): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``, state ``[N, H, K, V]``.
With ``cu_seqlens`` (LongTensor ``[N + 1]``) the batch size must be 1 and ``T`` holds N packed sequences.
Every function upcasts its inputs to float64 and returns float64 tensors.
"""
from reference.delta_rule import (
    delta_rule_chunkwise,
    delta_rule_householder,
    delta_rule_parallel,
    delta_rule_recurrent,
)
from reference.deltaformer import causal_softmax_attention, deltaformer_recurrent, deltaformer_solve
from reference.generalized_delta_rule import (
    dplr_recurrent,
    dplr_transition_product,
    iplr_recurrent,
    iplr_transition_product,
)
from reference.l2norm import l2norm

__all__ = [
    "delta_rule_recurrent",
    "delta_rule_householder",
    "delta_rule_chunkwise",
    "delta_rule_parallel",
    "iplr_recurrent",
    "iplr_transition_product",
    "dplr_recurrent",
    "dplr_transition_product",
    "deltaformer_recurrent",
    "deltaformer_solve",
    "causal_softmax_attention",
    "l2norm",
]
