"""DeltaNet: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t.

Three forms: chunk (chunkwise WY/UT, training), fused recurrent (token by token, inference/decode) and parallel
(quadratic, attention-like). `fused_chunk_delta_rule` is kept as an alias of `chunk_delta_rule`, as fla does."""
from ops.delta_rule.chunk import chunk_delta_rule
from ops.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from ops.delta_rule.parallel import parallel_delta_rule

fused_chunk_delta_rule = chunk_delta_rule

__all__ = ["chunk_delta_rule", "fused_chunk_delta_rule", "fused_recurrent_delta_rule", "parallel_delta_rule"]
