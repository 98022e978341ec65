"""Moved to :mod:`prunekit.distributed` (the ground floor, so the pruning engine can use it); re-exported here so
``from prunekit.train.distributed import ...`` keeps working."""

from prunekit.distributed import (  # noqa: F401
    all_reduce_mean,
    barrier,
    check_mapping_same_on_all_ranks,
    check_same_on_all_ranks,
    init_from_env,
    is_distributed,
    rank,
    sync_buffers,
    tensor_digest,
    world_size,
)

__all__ = ["all_reduce_mean", "barrier", "check_mapping_same_on_all_ranks", "check_same_on_all_ranks",
           "init_from_env", "is_distributed", "rank", "sync_buffers", "tensor_digest", "world_size"]
