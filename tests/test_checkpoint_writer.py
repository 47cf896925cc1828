"""Trajectory checkpoints written in the background: snapshots, order, pruning, manifests, errors, resume."""

import json
import os
import signal
import threading

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from loragen.errors import CheckpointError
from loragen.lora.adapter_io import read_adapter
from loragen.lora.snapshot import AdapterSnapshot
from loragen.stages.lora import save_adapter
from loragen.train import Checkpointer, fit
from loragen.train.checkpoints import BackgroundWriter
from tests.train_helpers import records, tiny_lora, train_cfg


def marker(path, gate: threading.Event | None = None, log: list | None = None):
    """A deferred save_fn result: writes `path`/step.txt (after `gate` opens)."""
    def write():
        if gate is not None:
            assert gate.wait(10)
        path.mkdir(parents=True)
        (path / "step.txt").write_text(path.name)
        if log is not None:
            log.append(path.name)
    return write


def manifest(root):
    return [(e["step"], e["path"]) for e in json.loads((root / "manifest.json").read_text())["checkpoints"]]


def test_snapshot_is_the_adapter_at_snapshot_time(paths, tmp_path):
    model, _, _ = tiny_lora(paths)
    snapshot = AdapterSnapshot(model)
    assert snapshot.sources is not None  # resolved to live tensors: no state_dict walk per save
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    save_adapter(model, tmp_path / "now")
    write = snapshot.deferred_write(tmp_path / "deferred")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # training goes on before the writer runs
    write()
    now, deferred = read_adapter(tmp_path / "now"), read_adapter(tmp_path / "deferred")
    assert now.config == deferred.config and now.tensors.keys() == deferred.tensors.keys()
    assert all(torch.equal(now.tensors[k], deferred.tensors[k]) for k in now.tensors)
    b = next(k for k in now.tensors if "lora_B" in k)
    assert torch.equal(now.tensors[b], torch.full_like(now.tensors[b], 0.25))  # lora_B starts at 0, +0.25


def test_deferred_writes_run_in_order_and_prune_after_the_newer_one(tmp_path):
    root, gate, written = tmp_path / "checkpoints", threading.Event(), []
    ckpt = Checkpointer(root, lambda p: marker(p, gate, written), every=1, keep_last=2)
    with ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"loss": 1.0 / step})
        assert written == [] and not root.exists()  # save() returned before any write
        gate.set()
    assert written == ["step-000001", "step-000002", "step-000003"]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "manifest.jsonl", "step-000002", "step-000003"]
    assert manifest(root) == [(2, "step-000002"), (3, "step-000003")]
    log = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [(e["step"], e["loss"]) for e in log] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path):
    root = tmp_path / "checkpoints"
    written = []

    def save_fn(path):
        if path.name == "step-000002":
            def fail():
                raise OSError(28, "No space left on device")
            return fail
        return marker(path, log=written)

    ckpt = Checkpointer(root, save_fn, every=1)
    ckpt.save(1, {})
    ckpt.save(2, {})
    ckpt.save(3, {})  # skipped by the writer: step 2 failed before it
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step-000002 failed: .*No space left on device"):
        ckpt.flush()
    ckpt.close()
    assert written == ["step-000001"]
    assert manifest(root) == [(1, "step-000001")]  # lists only what was written


def test_a_writer_error_is_raised_by_the_next_submit_once():
    w, ran = BackgroundWriter(), []
    w.submit(lambda: 1 / 0, what="x")
    for _ in range(1000):
        if w.failed:
            break
        threading.Event().wait(0.01)
    with pytest.raises(ZeroDivisionError):  # not an OSError: raised as it is
        w.submit(lambda: ran.append(1), what="y")
    w.submit(lambda: ran.append(2), what="z")
    w.drain()
    w.stop()
    assert w.failed and ran == []  # nothing runs after a failed write


def test_resumed_run_with_background_checkpoints_matches_an_uninterrupted_one(paths, tmp_path):
    def run(out, max_steps=5, on_step=None):
        model, obj, _ = tiny_lora(paths)
        ckpt = Checkpointer(out / "checkpoints", AdapterSnapshot(model).deferred_write, every=1, keep_last=4)
        return fit(model, obj.loss, records(), obj.collate, train_cfg(max_steps=max_steps), accelerator=Accelerator(cpu=True),
                   state_dir=out / "state", fingerprint={"test": 1}, checkpointer=ckpt, on_step=on_step)

    run(tmp_path / "straight")
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        first = run(tmp_path / "resumed", on_step=lambda step: step == 3 and os.kill(os.getpid(), signal.SIGUSR2))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert first.status == "preempted" and first.step == 3 and calls == [signal.SIGUSR2]
    assert manifest(tmp_path / "resumed" / "checkpoints") == [(s, f"step-{s:06d}") for s in (1, 2, 3)]
    second = run(tmp_path / "resumed")
    assert second.resumed_from == 3 and second.status == "completed"
    for out in ("straight", "resumed"):
        assert manifest(tmp_path / out / "checkpoints") == [(s, f"step-{s:06d}") for s in (2, 3, 4, 5)]
    for s in (2, 3, 4, 5):
        a, b = (load_file(str(tmp_path / out / "checkpoints" / f"step-{s:06d}" / "adapter_model.safetensors"))
                for out in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s
    losses = {out: {e["step"]: e["loss"] for e in json.loads((tmp_path / out / "checkpoints" / "manifest.json")
                                                               .read_text())["checkpoints"]} for out in ("straight", "resumed")}
    assert losses["straight"] == losses["resumed"]
