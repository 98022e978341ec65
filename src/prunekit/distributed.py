"""torchrun support: process-group set-up from the environment, rank helpers, and cross-rank agreement checks.
The ground floor: the pruning engine, the training loops and the run directories all use it.

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


def barrier() -> None:
    """Wait for every rank (a no-op in one process): ranks pass a stage boundary only once rank 0 wrote its files."""
    if is_distributed():
        dist.barrier()


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


def all_reduce_mean(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average same-shaped tensors across ranks, by key (a no-op in one process). Keys are taken in sorted order, so
    every rank must hold the same keys and shapes; the result is identical on every rank."""
    if not is_distributed() or not tensors:
        return tensors
    keys = sorted(tensors)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([tensors[k].detach().to(device, torch.float64).reshape(-1) for k in keys])
    dist.all_reduce(flat)
    flat /= world_size()
    out, o = {}, 0
    for k in keys:
        t = tensors[k]
        out[k] = flat[o:o + t.numel()].view(t.shape).to(t.device, t.dtype)
        o += t.numel()
    return out


def check_mapping_same_on_all_ranks(digests: dict[str, str], what: str) -> None:
    """Raise on every rank, naming the first differing key, if ``digests`` (key -> digest) differ between ranks."""
    if not is_distributed():
        return
    gathered: list[dict[str, str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, digests)
    keys = sorted(set().union(*(g or {} for g in gathered)))
    for k in keys:
        values = [(g or {}).get(k) for g in gathered]
        if len(set(values)) != 1:
            shown = ", ".join(f"rank {r}: {v[:12] if v else 'absent'}" for r, v in enumerate(values))
            # every rank sees the same gathered digests, so all raise here: let all of them finish the gather first,
            # or a rank that tears its process group down early aborts a peer still receiving (gloo: SIGABRT)
            dist.barrier()
            raise PruningError(f"{what} differ across ranks, first at {k!r} ({shown}); every rank must see identical "
                               "weights and synced statistics")


def sync_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks, in place; a no-op in one process.
    DDP copies rank 0's buffers at every forward, but each rank's last training step updates its own copy."""
    if not is_distributed():
        return
    bufs = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
    with torch.no_grad():
        for n, v in all_reduce_mean(bufs).items():
            bufs[n].copy_(v)
