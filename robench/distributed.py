"""Running over several processes with PyTorch's own engine: ranks launched by ``torchrun``
(``python -m torch.distributed.run``, one node or many) or by SLURM through submitit, one
``torch.distributed`` process group among them, and the arithmetic that splits work between
ranks.

A process started without a launcher (no ``WORLD_SIZE`` > 1 in its environment) is a world of
one: :func:`init` creates no process group and every collective here is a no-op, so a
single-process run behaves exactly as if this module did not exist.

Rules every split obeys (the pitfall of samplers that pad the last batch with repeated
samples, as ``DistributedSampler`` does by default): sample indices are split with **no padding
and no duplicates**, and a merge verifies that every index is present exactly once
(:func:`verify_cover`) before a result is published.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robench.errors import RobenchError

log = logging.getLogger(__name__)

SHARD_MODES = ("contiguous", "strided")
# How long a collective waits for the slowest rank. torch's default (30 min for gloo) is too
# short when one rank trains a linear probe on ImageNet features while the others wait.
DEFAULT_TIMEOUT_S = 6 * 3600
# Feature shards: at most this many batches each (a resumed run loses at most one shard per
# rank), and at least this many shards per dataset when it has enough batches.
MAX_SHARD_BATCHES = 16
TARGET_SHARDS = 256


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of a world of 1 without a
    launcher). ``backend`` is the process group's backend, None without one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_lead(self) -> bool:
        """Rank 0: the one that merges shards, writes shared artifacts and prints the table."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op in a world of one)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def all_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. 'is it cached everywhere?')."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (a picklable object)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._device())
        return box[0]

    def _device(self) -> Any:
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")


_WORLD = World()


def current() -> World:
    """The world :func:`init` set up (a world of one before, or without a launcher)."""
    return _WORLD


def env_world(environ: dict[str, str] | None = None) -> World:
    """Rank, world size and local rank from the launcher's environment, without touching any
    process group: ``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (submitit's
    ``TorchDistributedEnvironment().export()`` sets the same from SLURM's variables)."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise RobenchError(f"bad launcher environment: {e}",
                           "launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK) or "
                           "unset them for a single-process run") from e
    if size < 1 or not 0 <= rank < size:
        raise RobenchError(f"bad launcher environment: RANK={rank}, WORLD_SIZE={size}",
                           "launch with torchrun, or unset RANK / WORLD_SIZE")
    return World(rank=rank, size=size, local_rank=local)


def backend_for(device: str) -> str:
    """NCCL between CUDA devices, gloo otherwise (CPU, and the CPU side of MPS)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, world: World) -> str:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:<local rank>`` (one GPU per
    rank, torchrun's convention); anything else is left as it is."""
    return f"cuda:{world.local_rank}" if world.distributed and device == "cuda" else device


def init(device: str) -> World:
    """Join the run's process group when launched with more than one rank (idempotent).

    ``device`` is the resolved run device: it picks the backend (:func:`backend_for`) and, on
    CUDA, this rank's GPU. Without a launcher nothing happens and a world of one is returned.
    """
    global _WORLD
    world = env_world()
    if not world.distributed:
        return _WORLD
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return _WORLD
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("ROBENCH_DIST_TIMEOUT",
                                                              DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, timeout=timeout)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(),
                   local_rank=world.local_rank, backend=backend)
    log.info("rank %d of %d (%s)", _WORLD.rank, _WORLD.size, backend)
    return _WORLD


def shutdown() -> None:
    """Leave the process group (end of a run); a world of one has none."""
    global _WORLD
    if _WORLD.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()


# -- shard arithmetic -----------------------------------------------------------------------------
def shard_ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Split sample indices ``[0, n)`` into contiguous shards ``[start, stop)`` made of whole
    batches of ``batch_size`` (only the last shard may end in a partial batch), independent of
    the number of ranks, so a run resumed with another rank count reuses the finished shards.

    Each shard holds ``k = clamp(ceil(n_batches / TARGET_SHARDS), 1, MAX_SHARD_BATCHES)``
    batches. Because shard edges fall on batch edges, every rank encodes exactly the batches a
    single process would, which keeps the features bit-identical to a one-process run.
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"bad shard request: n={n}, batch_size={batch_size}")
    n_batches = math.ceil(n / batch_size)
    k = min(MAX_SHARD_BATCHES, max(1, math.ceil(n_batches / TARGET_SHARDS)))
    step = k * batch_size
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def assign(n_items: int, world: World, mode: str = "contiguous") -> list[int]:
    """The items (0..n_items-1) of this rank: ``contiguous`` gives rank r the block
    ``[r * n // size, (r + 1) * n // size)``, ``strided`` the items ``r, r + size, ...``. Every
    item belongs to exactly one rank; a rank may get none when items are fewer than ranks."""
    if mode not in SHARD_MODES:
        raise RobenchError(f"unknown shard mode '{mode}'", f"use one of {', '.join(SHARD_MODES)}")
    r, w = world.rank, world.size
    if mode == "strided":
        return list(range(r, n_items, w))
    return list(range(r * n_items // w, (r + 1) * n_items // w))


def balance(costs: Sequence[float], size: int) -> list[int]:
    """Owner rank of each unit of work, deterministic on every rank: in the given order, each
    unit goes to the rank with the least total cost so far (ties: the lowest rank)."""
    load = [0.0] * size
    owners = []
    for c in costs:
        r = min(range(size), key=lambda i: (load[i], i))
        owners.append(r)
        load[r] += float(c)
    return owners


def verify_cover(parts: Iterable[np.ndarray], n: int, what: str = "shards") -> None:
    """Check that the index arrays ``parts`` hold every index of ``[0, n)`` exactly once;
    raise a :class:`RobenchError` naming the missing, duplicated or out-of-range ones."""
    counts = np.zeros(n, dtype=np.int64)
    for p in parts:
        p = np.asarray(p, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= n):
            bad = p[(p < 0) | (p >= n)]
            raise RobenchError(f"{what}: index {int(bad[0])} is outside [0, {n})",
                               "delete the shard folder and re-run (the shards are recomputed)")
        np.add.at(counts, p, 1)
    missing, dup = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if missing.size or dup.size:
        def show(a: np.ndarray) -> str:
            return ", ".join(map(str, a[:5].tolist())) + (" ..." if a.size > 5 else "")

        problems = ([f"{missing.size} missing ({show(missing)})"] if missing.size else []) + \
            ([f"{dup.size} duplicated ({show(dup)})"] if dup.size else [])
        raise RobenchError(f"{what} do not cover [0, {n}) exactly once: " + "; ".join(problems),
                           "delete the shard folder and re-run (the shards are recomputed)")
