"""The training loop's batch prefetch: same batches in the same order, one ahead at most, errors at their step."""

import threading

import pytest

from loragen.errors import DataError
from loragen.train.batches import StepBatches
from loragen.train.prefetch import BatchPrefetcher


def test_batches_are_those_built_in_place_and_one_ahead_at_most():
    batches = StepBatches(12, per_device_batch=2, grad_accum=2, seed=5)
    built, threads = [], set()

    def collate(items):
        built.append(items)
        threads.add(threading.current_thread().name)
        return list(items)

    with BatchPrefetcher(list(range(12)), collate, batches, rank=0, max_steps=3) as prefetch:
        for step in range(3):
            for micro in range(2):
                assert prefetch.get(step, micro) == batches.micro_batch(step, micro, 0)
                assert len(built) <= step * 2 + micro + 2  # this one and at most the next
            prefetch.settle()
            assert len(built) == min(step * 2 + 3, 6)  # the next step's first batch is ready, nothing else
    assert built == [batches.micro_batch(s, m, 0) for s in range(3) for m in range(2)]
    assert any(name.startswith("prefetch") for name in threads)


def test_a_collate_error_is_raised_when_its_batch_is_asked_for():
    batches = StepBatches(8, per_device_batch=2, seed=0)
    bad = batches.micro_batch(1, 0, 0)[0]

    def collate(items):
        if bad in items:
            raise DataError(f"record {bad}: no gold answer")
        return items

    with BatchPrefetcher(list(range(8)), collate, batches, rank=0, max_steps=3) as prefetch:
        prefetch.get(0, 0)  # step 1's batch is built meanwhile, and fails
        prefetch.settle()
        with pytest.raises(DataError, match=f"record {bad}: no gold answer"):
            prefetch.get(1, 0)
