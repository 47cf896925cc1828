"""The next micro-batch is built on one thread while the current one runs forward and backward.

Building a batch (`items[i]`, `collate`: tokenization for the LM objectives) is a pure function of its
(step, micro-batch), so where it runs changes nothing: it only overlaps the model's compute instead of
preceding it (on a GPU, the device no longer waits for the tokenizer). It overlaps nothing else: the
loop settles the prefetch before a step's evaluation, checkpoints and hooks, which may use the same
tokenizer. `items[i]` and `collate` must therefore not use the global RNG nor state that the loss
function changes.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any, Callable, Sequence

from loragen.train.batches import StepBatches


class BatchPrefetcher:
    def __init__(self, items: Sequence, collate: Callable[[list], Any], batches: StepBatches, *, rank: int,
                 max_steps: int):
        self.items, self.collate, self.batches, self.rank, self.max_steps = items, collate, batches, rank, max_steps
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: tuple[tuple[int, int], futures.Future] | None = None

    def build(self, step: int, micro: int) -> Any:
        return self.collate([self.items[i] for i in self.batches.micro_batch(step, micro, self.rank)])

    def get(self, step: int, micro: int) -> Any:
        """The batch of (step, micro), prefetched or built now; starts building the one after it."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (step, micro):
            batch = pending[1].result()  # raises what collate raised
        else:
            if pending is not None:  # not the batch asked for: never build two at once
                futures.wait([pending[1]])
            batch = self.build(step, micro)
        following = (step, micro + 1) if micro + 1 < self.batches.grad_accum else (step + 1, 0)
        if following[0] < self.max_steps:
            self._pending = (following, self._pool.submit(self.build, *following))
        return batch

    def settle(self) -> None:
        """Wait until the batch being built is done (get raises its error, if any)."""
        if self._pending is not None:
            futures.wait([self._pending[1]])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = None

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
