"""Which documents each process sees at each optimizer step: a pure function of (seed, step).

The data position of a run is therefore just its step count, so resuming needs no sampler
state, and N processes with per-device batch b see exactly the global batch one process with
batch N·b would see. Step s (0-based) of epoch e = s // steps_per_epoch takes the s-th slice of
`global_batch` items of a permutation seeded by (seed, e); the last incomplete slice of an epoch
is dropped. Within a global batch, micro-batch m of rank r is slice (m · world + r).
"""

from __future__ import annotations

import torch

from loragen.errors import DataError


class StepBatches:
    def __init__(self, num_items: int, *, per_device_batch: int, world_size: int = 1, grad_accum: int = 1,
                 seed: int = 0, what: str = "the training data"):
        self.num_items, self.per_device_batch = int(num_items), int(per_device_batch)
        self.world_size, self.grad_accum, self.seed = int(world_size), int(grad_accum), int(seed)
        if self.per_device_batch < 1 or self.grad_accum < 1:
            raise DataError(f"per_device_batch={per_device_batch} and train.grad_accum={grad_accum} must be >= 1")
        self.global_batch = self.per_device_batch * self.world_size * self.grad_accum
        if self.num_items < self.global_batch:
            raise DataError(
                f"{what} has {self.num_items} documents, fewer than one global batch of {self.global_batch} "
                f"(per_device_batch {self.per_device_batch} x {self.world_size} processes x train.grad_accum "
                f"{self.grad_accum}); use a smaller batch or more data"
            )
        self.steps_per_epoch = self.num_items // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        return self._perm[1]

    def micro_batch(self, step: int, micro: int, rank: int) -> list[int]:
        """Item indices of micro-batch `micro` on process `rank` at optimizer step `step` (0-based)."""
        epoch, k = divmod(int(step), self.steps_per_epoch)
        start = k * self.global_batch + (micro * self.world_size + rank) * self.per_device_batch
        return self._permutation(epoch)[start:start + self.per_device_batch].tolist()

    def global_batch_indices(self, step: int) -> list[int]:
        return [i for m in range(self.grad_accum) for r in range(self.world_size) for i in self.micro_batch(step, m, r)]
