"""deltacheck ops: Triton kernels for the delta-rule family, drop-in compatible with fla's signatures."""
from ops.delta_rule import chunk_delta_rule, fused_chunk_delta_rule, fused_recurrent_delta_rule, parallel_delta_rule
from ops.deltaformer import causal_attention, deltaformer_attn
from ops.generalized_delta_rule import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
)

__all__ = ["chunk_delta_rule", "fused_chunk_delta_rule", "fused_recurrent_delta_rule", "parallel_delta_rule",
           "chunk_iplr_delta_rule", "fused_recurrent_iplr_delta_rule", "chunk_dplr_delta_rule",
           "fused_recurrent_dplr_delta_rule", "deltaformer_attn", "causal_attention"]
