"""loragen's loop + its MiniLM objective (texts embedded in groups of similar length) take the same first steps as
transformers' Trainer + PEFT with the objective written straightforwardly (questions and choices each one padded
batch): the speed-up of `make bench` (train_encoder) is not bought with a different computation.

Both see the same micro-batches (Trainer in the order loragen's StepBatches draws them), constant lr, no dropout
(MiniLM's dropout modules set to 0),
AdamW with the same hyper-parameters and clipping; the losses differ only by float rounding (padding and grouping
change the order of sums), which stays far below 1e-4 relative over five steps.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from loragen.bench.train import _paths, _setup, padded
from loragen.data import load_split
from loragen.models.pooling import length_groups
from loragen.train import fit
from loragen.train.batches import StepBatches
from tests.conftest import CONF

STEPS, BATCH, LR = 5, 8, 1e-3


def train_cfg():
    cfg = OmegaConf.load(CONF / "train" / "default.yaml")
    cfg.merge_with({"max_steps": STEPS, "lr": LR, "per_device_batch": BATCH, "seed": 0, "save_state_every": 0,
                    "log_every": 1, "resume": "never", "schedule": "constant", "max_grad_norm": 1.0})
    return cfg


def without_dropout(model):
    """MiniLM's hidden and attention dropout draw from each loop's RNG in its own order: off, the steps compare."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def loragen_losses(records, tmp_path) -> list[float]:
    from accelerate import Accelerator

    model, obj = _setup("encoder")
    without_dropout(model)
    result = fit(model, obj.loss, records, obj.collate, train_cfg(), accelerator=Accelerator(cpu=True),
                 state_dir=tmp_path / "state")
    return [row["loss"] for row in result.history]


def trainer_losses(records, tmp_path) -> list[float]:
    from transformers import Trainer, TrainingArguments

    model, obj = _setup("encoder", encode=padded)
    without_dropout(model)
    sb = StepBatches(len(records), per_device_batch=BATCH, seed=0)
    ordered = [records[i] for s in range(STEPS) for i in sb.micro_batch(s, 0, 0)]
    losses = []

    class ObjectiveTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, units = obj.loss(model, inputs)
            losses.append(float(loss_sum.detach() / units))
            return loss_sum / units

        def _get_train_sampler(self, *args, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def collate(items):
        batch = obj.collate(items)
        batch.pop("num_tokens")
        return batch

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                             adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=STEPS,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             remove_unused_columns=False, disable_tqdm=True)
    ObjectiveTrainer(model=model, args=args, train_dataset=ordered, data_collator=collate).train()
    return losses


def test_minilm_first_five_losses_equal_trainer_with_padded_objective(tmp_path):
    spec = OmegaConf.load(CONF / "dataset" / "arc_easy.yaml")
    records = load_split(spec, "train", data_dir=_paths().data_dir, limit=STEPS * BATCH).records
    ours = loragen_losses(records, tmp_path / "ours")
    ref = trainer_losses(records, tmp_path / "ref")
    assert len(ours) == len(ref) == STEPS
    assert all(math.isfinite(v) for v in ours)
    assert ours != pytest.approx([ours[0]] * STEPS, rel=1e-3)  # the model learns: the losses move
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)


def brute_force_cost(lengths: list[int], call_cost: int) -> int:
    """The least padded tokens + call_cost per group over every partition of the sorted lengths into runs."""
    sl, best = sorted(lengths), None
    for k in range(len(sl)):
        for cuts in itertools.combinations(range(1, len(sl)), k):
            bounds = [0, *cuts, len(sl)]
            cost = sum((b - a) * sl[b - 1] + call_cost for a, b in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("lengths", [[5], [3, 3, 3], [10, 60, 12, 58, 11, 59, 30], [1, 2, 4, 8, 16, 32, 64, 128]])
@pytest.mark.parametrize("call_cost", [0, 16, 1000])
def test_length_groups_cover_every_index_once_at_the_least_cost(lengths, call_cost):
    groups = length_groups(lengths, call_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    cost = sum(len(g) * max(lengths[i] for i in g) + call_cost for g in groups)
    assert cost == brute_force_cost(lengths, call_cost)
    if call_cost == 1000:
        assert len(groups) == 1
