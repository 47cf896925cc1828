"""Every user-caused failure is one line on stderr (`loragen: error: ...`), exit != 0, no traceback on the console
(it goes to the run's loragen.log; LORAGEN_DEBUG=1 prints it too). One test per failure of issue 17, item 4."""

import errno
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from loragen import cli, io
from loragen.data.records import MCRecord
from loragen.errors import DiskFullError, OverlongError, WriteError
from loragen.evaluation import evaluate_records
from tests.conftest import run_cli, run_stage_in_process
from tests.test_provenance import make_adapter

PIQA_OVERLONG = ["stage=evaluate", "model=tiny_qwen2", "dataset=piqa", "tracker=none",
                 "eval.split='validation[310:318]'"]  # validation document 314: a 615-token choice on tiny_qwen2 (512)


def one_line(proc) -> str:
    """The failure's stderr: exactly one line, `loragen: error: ...`, and no traceback."""
    assert proc.returncode not in (0, None), proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("loragen: error: "), lines[0]
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create files in: chmod 555, and for root (whom permissions do not stop) the
    immutable attribute (chattr +i); skipped where neither works."""
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        (d / "probe").mkdir()
    except OSError:
        pass
    else:
        (d / "probe").rmdir()
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    os.chmod(d, 0o755)


def test_wrong_type_names_the_key_before_anything_loads(tmp_path):
    run = tmp_path / "run"
    line = one_line(run_cli(["stage=lora", "model=tiny_qwen2", "train.max_steps=abc", f"hydra.run.dir={run}"],
                            check=False))
    assert line == ("loragen: error: train.max_steps=abc: Value 'abc' of type 'str' could not be converted to "
                    "Integer (train.max_steps expects int)")
    assert not run.exists()  # refused while composing: no run dir, no model
    line = one_line(run_cli(["stage=lora", "train.max_stepz=3", f"hydra.run.dir={run}"], check=False))
    assert "train.max_stepz" in line and "did you mean train.max_steps?" in line
    line = one_line(run_cli(["stage=lora", "model=tiny_qwenX", f"hydra.run.dir={run}"], check=False))
    assert "Could not find 'model/tiny_qwenX'" in line and "tiny_qwen2" in line and "search path" not in line


def test_debug_env_shows_the_traceback(tmp_path):
    proc = run_cli(["stage=lora", "train.max_steps=abc", f"hydra.run.dir={tmp_path / 'run'}"], check=False,
                   env={"LORAGEN_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("loragen: error: train.max_steps=abc")


def test_unwritable_run_dir(read_only_dir):
    for run in (read_only_dir, read_only_dir / "run"):  # existing but read-only; to be created inside one
        line = one_line(run_cli(["stage=evaluate", "model=tiny_qwen2", f"hydra.run.dir={run}"], check=False))
        assert f"cannot write {read_only_dir}" in line and "choose another with hydra.run.dir=" in line


def test_unwritable_cache_dir(read_only_dir, tmp_path):
    run = tmp_path / "run"
    line = one_line(run_cli(["stage=evaluate", "model=tiny_qwen2", "dataset=arc_easy", "eval.limit=2", "tracker=none",
                             f"paths.cache_dir={read_only_dir / 'cache'}", f"hydra.run.dir={run}"], check=False))
    assert f"cannot write {read_only_dir / 'cache'}" in line
    assert f"paths.cache_dir={read_only_dir / 'cache'} must be writable: set LORAGEN_CACHE_DIR=" in line
    log = (run / "loragen.log").read_text()
    assert "Traceback" in log and "PermissionError" in log  # the full traceback is in the run's log


@pytest.mark.parametrize("data_dir", [None, ""])
def test_offline_without_local_data(tmp_path, data_dir):
    env = {k: v for k, v in os.environ.items() if k != "LORAGEN_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # an empty Hugging Face cache
    if data_dir is not None:
        env["LORAGEN_DATA_DIR"] = data_dir
    proc = subprocess.run(
        [os.sys.executable, "-m", "loragen", "stage=evaluate", "model=minilm", "dataset=arc_easy", "tracker=none",
         f"hydra.run.dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
    line = one_line(proc)
    assert "dataset arc_easy (split test)" in line and "hub:allenai/ai2_arc/ARC-Easy" in line
    assert str(tmp_path / "hf") in line  # where it looked
    assert ("LORAGEN_DATA_DIR is not set" if data_dir is None else "LORAGEN_DATA_DIR is empty") in line
    assert "Set LORAGEN_DATA_DIR to a directory holding arc_easy/test.jsonl" in line and "HF_HUB_OFFLINE" in line


def test_lora_run_dir_given_as_adapter(paths, tmp_path):
    run = tmp_path / "lora_run"
    make_adapter(paths, "tiny_qwen2", run / "final")
    (run / "checkpoints").mkdir()
    line = one_line(run_cli(["stage=evaluate", "model=tiny_qwen2", "tracker=none", f"eval.adapters=[{run}]",
                             f"hydra.run.dir={tmp_path / 'ev'}"], check=False))
    assert line == (f"loragen: error: {run} is not a PEFT adapter directory; it is a loragen run directory: use its "
                    f"adapter {run / 'final'}")


# ---- over-long documents ---------------------------------------------------------------------------------------

def test_overlong_document_is_an_error_naming_it(tmp_path):
    line = one_line(run_cli([*PIQA_OVERLONG, f"hydra.run.dir={tmp_path / 'err'}"], check=False))
    assert "dataset piqa split validation[310:318], document 4 (id piqa/validation/314)" in line
    assert "the continuation is 615 tokens, longer than the model's context of 512" in line
    assert "eval.overlong=truncate" in line


def test_overlong_truncate_scores_and_marks(tmp_path):
    run = tmp_path / "tr"
    run_cli([*PIQA_OVERLONG, "eval.overlong=truncate", f"hydra.run.dir={run}"])
    (entry,) = json.loads((run / "results.json").read_text())["results"]
    assert entry["n"] == 8 and entry["truncated"] == 1
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples if s.get("truncated")] == ["piqa/validation/314"]
    assert "piqa: 1 of 8 documents had a choice longer than the model's context" in (run / "results.md").read_text()


class CharTok:
    """One token per character."""
    pad_token_id = 0

    def __call__(self, texts, **_):
        one = isinstance(texts, str)
        ids = [[ord(ch) % 50 + 1 for ch in t] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}


class Unigram(torch.nn.Module):
    """Every position predicts softmax(bias); a context of 8 positions."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        self.config = SimpleNamespace(max_position_embeddings=8)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_truncate_keeps_the_last_tokens_that_fit():
    model, tok = Unigram(), CharTok()
    logp = torch.log_softmax(model.bias.detach().double(), -1)
    rec = MCRecord("long", ("Q:",), (" abcdefghijkl", " ab"), ("abcdefghijkl", "ab"), 1, "Q:")
    with pytest.raises(OverlongError, match=r"where, document 0 \(id long\), choice 0: the continuation is 13 tokens, "
                                            r"longer than the model's context of 8 \(context 2 tokens\)"):
        evaluate_records(model, tok, "causal", [rec], batch_size=2, where="where")
    out = evaluate_records(model, tok, "causal", [rec], batch_size=2, overlong="truncate")
    ids = tok(" abcdefghijkl")["input_ids"]
    assert out.samples[0]["scores"][0] == pytest.approx(float(logp[ids[-8:]].sum()))  # its last 8 tokens
    assert out.samples[0]["scores"][1] == pytest.approx(float(logp[tok(" ab")["input_ids"]].sum()))
    assert out.samples[0]["truncated"] is True and out.truncated == 1
    assert evaluate_records(model, tok, "causal", [rec], batch_size=2, overlong="truncate").truncated == 1


def test_progress_counts_documents(monkeypatch):
    seen = []

    class Bar:
        def __init__(self, total, desc="", every=10, unit="it"):
            seen.append(("total", total, unit))

        def update(self, n=1):
            seen.append(("update", n))

        def close(self):
            pass

    monkeypatch.setattr("loragen.evaluation.evaluator.ProgressBar", Bar)
    recs = [MCRecord(str(i), ("Q:",), (" a", " bb", " ccc"), ("a", "bb", "ccc"), 0, "Q:") for i in range(5)]
    evaluate_records(Unigram(), CharTok(), "causal", recs, batch_size=4)
    assert seen[0] == ("total", 5, "doc")  # 5 documents, not 15 (question, choice) pairs
    assert sum(n for kind, n, *_ in seen if kind == "update") == 5


# ---- disk full -------------------------------------------------------------------------------------------------

def test_atomic_writer_turns_a_full_disk_into_one_error(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old\n")

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError, match=rf"disk full: {target} was not written \(No space left on device, "
                                            r"\d+ MB free on its file system\); an earlier results.json, if any, is "
                                            r"intact") as e:
        io.write_json(target, {"new": 1})
    assert e.value.errno == errno.ENOSPC and e.value.path == str(target)
    monkeypatch.undo()
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_writer_names_an_unwritable_dir(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr("loragen.io.tempfile.mkdtemp", denied)
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'run'}: Permission denied"):
        io.write_text(tmp_path / "run" / "x.txt", "x")
    monkeypatch.undo()
    with pytest.raises(PermissionError):  # a file the block reads is not a write error
        with io.atomic_path(tmp_path / "out") as tmp:  # noqa: F841
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/elsewhere")


def test_disk_full_during_a_lora_run_says_what_was_saved(tmp_path, monkeypatch):
    from loragen.lora import adapter_io

    real = adapter_io.save_file

    def save_file(tensors, filename, metadata=None):
        if "/.final." in str(filename):  # the final adapter's temporary dir: the disk is full now
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(adapter_io, "save_file", save_file)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as e:
        run_stage_in_process(["stage=lora", "model=tiny_qwen2", "dataset=arc_easy", "tracker=none", "lora.r=2",
                              "train.max_steps=2", "train.per_device_batch=2", "lora.train_limit=8", "ckpt.every=1",
                              "train.save_state_every=2", "lora.eval_base=false", "lora.final_eval_limit=2"], run)
    message = cli.user_message(e.value, None, run=run)
    assert message.startswith(f"disk full: {run / 'final'} was not written")
    assert (f"saved in {run}: the training state at step 2 (state/), 2 checkpoints up to step-000002; "
            "not written: final, results.json; free some space and rerun the same command to resume") in message
    assert not (run / "final").exists() and not [p for p in run.iterdir() if p.name.startswith(".final")]


def test_an_unexpected_error_is_one_line_naming_the_log(tmp_path, capsys):
    import logging

    handler = logging.FileHandler(tmp_path / "loragen.log")
    logging.getLogger().addHandler(handler)
    try:
        try:
            [][1]
        except IndexError as e:
            code = cli.report(e, OmegaConf.create({}))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [
        f"loragen: error: unexpected IndexError: list index out of range (a bug? traceback in {tmp_path / 'loragen.log'})"]
    assert "Traceback" in (tmp_path / "loragen.log").read_text()
