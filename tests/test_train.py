"""The one training loop: batching, schedule, objectives, accumulation/DDP equality, resume, preemption, divergence."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

from loragen.errors import CheckpointError, DataError
from loragen.train import Checkpointer, TrainingDiverged, fit
from loragen.train.batches import StepBatches
from loragen.train.schedule import lr_factor
from loragen.train.state import trainable_tensors
from tests.conftest import ROOT
from tests.train_helpers import records, tiny_lora, train_cfg


def test_step_batches_split_one_global_batch_across_processes():
    one = StepBatches(10, per_device_batch=4, world_size=1, seed=3)
    two = StepBatches(10, per_device_batch=2, world_size=2, seed=3)
    acc2 = StepBatches(10, per_device_batch=2, world_size=1, grad_accum=2, seed=3)
    assert one.steps_per_epoch == 2  # 10 // 4, the incomplete slice dropped
    for step in range(5):
        g = one.micro_batch(step, 0, 0)
        assert sorted(two.micro_batch(step, 0, 0) + two.micro_batch(step, 0, 1)) == sorted(g)
        assert acc2.global_batch_indices(step) == two.global_batch_indices(step)
    epoch0 = one.micro_batch(0, 0, 0) + one.micro_batch(1, 0, 0)
    assert len(set(epoch0)) == 8  # no repeats within an epoch
    assert one.micro_batch(2, 0, 0) != one.micro_batch(0, 0, 0)  # a new permutation per epoch


def test_dataset_smaller_than_global_batch_is_an_error():
    with pytest.raises(DataError, match=r"dataset x has 5 documents, fewer than one global batch of 8 "
                                        r"\(per_device_batch 4 x 2 processes x train.grad_accum 1\)"):
        StepBatches(5, per_device_batch=4, world_size=2, what="dataset x")


def test_warmup_then_cosine_and_linear():
    kw = dict(warmup_steps=2, max_steps=10)
    assert [lr_factor(s, schedule="cosine", **kw) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, schedule="cosine", **kw) == 1.0
    assert lr_factor(6, schedule="cosine", **kw) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(6, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(4, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(10, schedule="linear", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)


def test_causal_loss_is_the_answer_tokens_only(paths):
    model, obj, lm = tiny_lora(paths)
    recs = records(3)
    loss_sum, units = obj.loss(model, obj.collate(recs))
    expected, n = 0.0, 0
    for r in recs:  # independently: tok(ctx + cont)[len(tok(ctx)):] scored one document at a time
        ctx, cont = r.context(r.gold), r.continuations[r.gold]
        ctx_ids = lm.tokenizer(ctx)["input_ids"]
        ids = lm.tokenizer(ctx + cont)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected -= sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx_ids), len(ids)))
        n += len(ids) - len(ctx_ids)
    assert units == n
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)


def test_encoder_loss_is_ce_over_cosines(paths):
    from omegaconf import OmegaConf

    from loragen.models import load_model
    from loragen.train.objectives import make_objective
    from tests.conftest import CONF

    lm = load_model(OmegaConf.load(CONF / "model" / "minilm.yaml"), paths)
    obj = make_objective("encoder", lm.tokenizer, max_length=128, temperature=0.1)
    recs = records(2)
    loss_sum, units = obj.loss(lm.model, obj.collate(recs))

    def emb(text):
        enc = lm.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            return F.normalize(lm.model(**enc).last_hidden_state[0].mean(0), dim=0)

    expected = 0.0
    for r in recs:
        q = emb(r.contexts[0])
        logits = torch.stack([q @ emb(c.strip()) for c in r.continuations]) / 0.1
        expected -= float(logits.log_softmax(0)[r.gold])
    assert units == 2 and float(loss_sum) == pytest.approx(expected, rel=1e-4)


def _fit(paths, tmp, acc=None, **kw):
    model, obj, _ = tiny_lora(paths)
    hooks = {k: kw.pop(k) for k in ("on_step", "checkpointer", "loss") if k in kw}
    res = fit(model, hooks.get("loss", obj.loss), records(), obj.collate, train_cfg(**kw), accelerator=acc or Accelerator(cpu=True),
              state_dir=tmp / "state", fingerprint={"test": 1}, on_step=hooks.get("on_step"),
              checkpointer=hooks.get("checkpointer"))
    return model, res


def test_grad_accum_equals_one_big_batch(paths, tmp_path):
    a, ra = _fit(paths, tmp_path / "a", per_device_batch=4, max_steps=2)
    b, rb = _fit(paths, tmp_path / "b", per_device_batch=2, grad_accum=2, max_steps=2)
    ta, tb = trainable_tensors(a), trainable_tensors(b)
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
    assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rb.history], rel=1e-5)
    assert not torch.equal(ta[next(k for k in ta if "lora_B" in k)], torch.zeros(1))  # it trained


def test_preempted_run_resumes_to_identical_weights(paths, tmp_path):
    straight, _ = _fit(paths, tmp_path / "straight", max_steps=4)
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's handler
    try:
        def preempt_at_2(step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)

        _, first = _fit(paths, tmp_path / "resumed", max_steps=4, on_step=preempt_at_2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert first.status == "preempted" and first.step == 2 and calls == [signal.SIGUSR2]
    assert (tmp_path / "resumed" / "state" / "trainer.json").is_file()
    resumed, second = _fit(paths, tmp_path / "resumed", max_steps=4)
    assert second.resumed_from == 2 and second.status == "completed" and second.step == 4
    ts, tr = trainable_tensors(straight), trainable_tensors(resumed)
    assert all(torch.equal(ts[k], tr[k]) for k in ts)


def test_resume_with_another_config_is_refused(paths, tmp_path):
    _fit(paths, tmp_path, max_steps=1)
    with pytest.raises(CheckpointError, match=r"different config; differing keys: train.lr: 0.005 \(saved\) vs 0.001 \(now\)"):
        _fit(paths, tmp_path, max_steps=1, lr=1e-3)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(paths, tmp_path):
    model, obj, _ = tiny_lora(paths)
    seen = []

    def loss(m, batch):
        s, n = obj.loss(m, batch)
        seen.append(1)
        return (s * float("nan") if len(seen) == 3 else s), n

    # a deferred write (run by the background writer): the message waits for it
    ckpt = Checkpointer(tmp_path / "checkpoints", lambda p: lambda: p.mkdir(parents=True), every=1)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: loss nan.*Last good checkpoint: .*step-000002"):
        fit(model, loss, records(), obj.collate, train_cfg(max_steps=5), accelerator=Accelerator(cpu=True),
            state_dir=tmp_path / "state", checkpointer=ckpt)
    listing = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert listing == ["manifest.json", "manifest.jsonl", "step-000001", "step-000002"]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "ddp_train_worker.py")
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker, str(tmp_path), "2", "2"],
                [sys.executable, worker, str(tmp_path), "4", "1"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = load_file(str(tmp_path / "lora1.safetensors")), load_file(str(tmp_path / "lora2.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-4) for k in one)
    assert any(not torch.allclose(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
    l1, l2 = ((tmp_path / f"loss{w}.txt").read_text().split() for w in (1, 2))
    assert [float(x) for x in l1] == pytest.approx([float(x) for x in l2], rel=1e-5)


def test_every_evaluation_is_kept_in_the_history(paths, tmp_path):
    # Metrics without an eval_acc key (the generator's reconstruction errors) between log steps.
    model, obj, _ = tiny_lora(paths)
    seen = []

    def eval_fn(m):
        seen.append(1)
        return {"heldout_error": float(len(seen))}

    res = fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=6, eval_every=2, log_every=5),
              accelerator=Accelerator(cpu=True), state_dir=tmp_path / "state", fingerprint={"test": 1}, eval_fn=eval_fn)
    evals = [(h["step"], h["heldout_error"]) for h in res.history if "heldout_error" in h]
    assert evals == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert [h["step"] for h in res.history] == [2, 4, 5, 6]
