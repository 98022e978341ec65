"""torchrun support: process-group set-up from the environment, rank helpers, and cross-rank agreement checks.

``torchrun --nproc_per_node N -m prunekit run RECIPE.yaml`` (or ``train``/``finetune``): every rank runs the same
stages; the training batches are split with a DistributedSampler, gradients are averaged by DDP, validation runs on
the full set on every rank (exact, identical metrics), pruning statistics are all-reduced before scoring and the
chosen channels are checked to be identical on every rank; only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.distributed as dist

from prunekit.errors import PruningError

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1). Returns whether it did."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("distributed: rank %d of %d (%s)", rank(), world_size(), backend)
    if rank() != 0:  # only rank 0 talks
        logging.getLogger("prunekit").setLevel(logging.WARNING)
    return True


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.int64 if not t.is_floating_point() else torch.float64).numpy().tobytes())
    return h.hexdigest()


def check_same_on_all_ranks(digest: str, what: str) -> None:
    """Raise on every rank if ``digest`` differs between ranks (e.g. the pruning masks)."""
    if not is_distributed():
        return
    gathered: list[str | None] = [None] * world_size()
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) != 1:
        raise PruningError(f"{what} differ across ranks ({', '.join(g[:12] for g in gathered if g)}); the ranks "
                           "must see identical statistics and break ties the same way")
