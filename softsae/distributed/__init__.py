"""softsae on torch.distributed: dictionary-sharded ops and global (data-parallel) batch statistics.

    from softsae import distributed as sd
    ctx = sd.init_from_env()                                  # torchrun env, nccl on GPUs / gloo on CPU, timeouts
    lo, hi = sd.shard_range(n, ctx.rank, ctx.world_size)      # this rank's latents
    z_r = sd.sharded_soft_topk_gate(pre[:, lo:hi], k_hat, alpha)   # global threshold: sum p = k over all shards
    x_hat = sd.sharded_decode(vals, idx, W_dec_r, b_dec)
    sd.check_batch(x_r, d)                                    # bad data on any rank: one error everywhere

See sharded_ops.py (layout, gradient convention, collectives per call) and stats.py. The models'
placements over a process group are in placement.py (dictionary mode: ``shard_model_``), the full <->
sharded training state in state.py; the training strategies that use them are ``softsae.parallel``.
"""

from softsae.distributed._comm import DistributedInputError
from softsae.distributed.placement import ShardedLatents, ShardedRows, shard_model_
from softsae.distributed.process import (
    DistContext,
    choose_backend,
    default_timeout,
    init_from_env,
    shard_range,
    shard_sizes,
    shutdown,
)
from softsae.distributed.sharded_ops import (
    copy_to_shards,
    reduce_from_shards,
    sharded_batch_topk,
    sharded_decode,
    sharded_gate_k_direction,
    sharded_soft_topk,
    sharded_soft_topk_gate,
    sharded_topk_per_row,
)
from softsae.distributed.stats import check_batch, merge_fired

__all__ = [
    "DistContext",
    "DistributedInputError",
    "ShardedLatents",
    "ShardedRows",
    "check_batch",
    "choose_backend",
    "copy_to_shards",
    "default_timeout",
    "init_from_env",
    "merge_fired",
    "reduce_from_shards",
    "shard_range",
    "shard_sizes",
    "shutdown",
    "sharded_batch_topk",
    "sharded_decode",
    "sharded_gate_k_direction",
    "sharded_soft_topk",
    "sharded_soft_topk_gate",
    "sharded_topk_per_row",
    "shard_model_",
]
