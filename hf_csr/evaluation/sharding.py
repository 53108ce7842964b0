"""What makes a robust evaluation independent of how it is split: keyed randomness and process shards.

* **Keyed randomness.** Every random number an attack draws for an example is a function of
  ``(seed, attack, round, example index, element)`` alone: a counter-based generator (an integer hash of
  those values, computed with exact 32-bit integer arithmetic in torch, vectorised over the batch). The
  random start of example ``q`` under PGD-20 is therefore the same whatever batch ``q`` is in, whatever
  process attacks it, and on a resumed run; on CPU and GPU alike (the uniforms are exact; the Gaussians of
  L2 starts go through ``log``/``cos``, whose last bit may differ between devices).
* **Shards.** The examples are cut into fixed chunks of ``batch_size`` in dataset order (the chunks one
  process would form), and chunk ``j`` is attacked by process ``j mod world_size``; the outcomes are
  gathered on every process after each attack (AutoAttack: after each component, whose survivors are then
  re-chunked in dataset order exactly as one process would). So the chunks, and everything computed from
  them, do not depend on the number of processes.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Shards", "example_keys", "keyed_normal", "keyed_uniform"]

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the 'lowbias32' finaliser): every input bit affects every output bit."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def example_keys(seed: int, stream: str, indices: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per example: a hash of ``seed``, the ``stream`` name (attack, round) and its index.

    ``indices`` are positions in the evaluated set (not in a batch), so a key never depends on the split.
    """
    salt = zlib.crc32(f"{int(seed)}/{stream}".encode())
    indices = indices.to(torch.int64)
    mixed = _mix32(indices & _MASK32) ^ _mix32((indices >> 32) + 0x9E3779B9)
    return _mix32(mixed ^ salt)


def keyed_uniform(keys: torch.Tensor, shape, *, device=None) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers of ``(len(keys), *shape)``, row ``i`` a function of ``keys[i]`` alone."""
    numel = math.prod(shape)
    keys = keys.to(device=device if device is not None else keys.device, dtype=torch.int64)
    counters = _mix32(torch.arange(numel, device=keys.device, dtype=torch.int64) * 2 + 1)
    bits = _mix32(_mix32(keys[:, None] ^ counters[None, :]) + keys[:, None])
    # the top 24 bits: exactly representable in float32, so the same numbers on every device
    return ((bits >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(len(keys), *shape)


def keyed_normal(keys: torch.Tensor, shape, *, device=None) -> torch.Tensor:
    """Standard normal float32 numbers (Box-Muller on two keyed uniform streams), row by row as above."""
    u1 = keyed_uniform(_mix32(keys.to(torch.int64) ^ 0x5BD1E995), shape, device=device)
    u2 = keyed_uniform(_mix32(keys.to(torch.int64) ^ 0x1B873593), shape, device=device)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)


class Shards:
    """This process's share of an evaluation, and the gathering of the others' results.

    ``distributed=False``: one process does everything. ``True``: the ``torch.distributed`` default
    process group (initialised by ``accelerate launch`` / ``torchrun`` through Accelerate, or by the
    Trainer) splits the chunks; every process must call the evaluation with the same arguments.
    """

    def __init__(self, distributed: bool) -> None:
        self.rank, self.world_size = 0, 1
        if distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "distributed=True needs an initialised torch.distributed process group: launch with "
                    "`accelerate launch` or `torchrun` and create accelerate.PartialState() first (hf-csr evaluate "
                    "does), or pass distributed=False."
                )
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether chunk ``index`` is attacked by this process."""
        return index % self.world_size == self.rank

    def gather(self, local: Dict[int, Any]) -> Dict[int, Any]:
        """Every process's ``{chunk index: payload}``, merged, on every process."""
        if self.world_size == 1:
            return dict(local)
        import torch.distributed as dist

        boxes: List[Optional[Dict[int, Any]]] = [None] * self.world_size
        dist.all_gather_object(boxes, local)
        merged: Dict[int, Any] = {}
        for box in boxes:
            merged.update(box or {})
        return merged

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
