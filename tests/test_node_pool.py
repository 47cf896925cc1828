"""hydra/launcher=node_pool on CPU with a fake device list: pinning, queueing, failures reported per job."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import DATA_DIR, run_cli


def _job_lines(log_path: str) -> dict:
    text = open(log_path).read()
    start = re.search(r"node_pool: job #(\d+) CUDA_VISIBLE_DEVICES=(\S*) start=([\d.]+)", text)
    end = re.search(r"node_pool: job #\d+ end=([\d.]+)", text)
    return {"num": int(start.group(1)), "devices": start.group(2), "start": float(start.group(3)),
            "end": float(end.group(1))}


def test_node_pool_pins_queues_and_reports_failures(tmp_path):
    sweep = tmp_path / "sweep"
    bad = tmp_path / "no_data_here"
    proc = run_cli(["-m", "stage=data", "dataset=arc_easy", "tracker=none", f"paths.data_dir={DATA_DIR},{bad},{DATA_DIR}",
                    "hydra/launcher=node_pool", "hydra.launcher.devices=[5,7]", f"hydra.sweep.dir={sweep}"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in summary] == ["completed", "failed", "completed"]
    failed = summary[1]
    assert f"paths.data_dir={bad}" in failed["job"] and "not found in the local data dir" in failed["error"]
    # the one-line error names the failed job and its log; the other jobs still ran to the end
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("loragen: error: 1 of 3 sweep jobs failed") and failed["log"] in err
    assert (sweep / "0" / "data_summary.json").is_file() and (sweep / "2" / "data_summary.json").is_file()

    runs = sorted((_job_lines(j["log"]) for j in summary), key=lambda r: r["num"])
    assert [r["devices"] for r in runs[:2]] == ["5", "7"]          # one fake GPU each, from the declared list
    assert runs[2]["devices"] in {"5", "7"}
    assert runs[0]["start"] < runs[1]["end"] and runs[1]["start"] < runs[0]["end"]  # the first two ran at once
    same_slot = runs[0] if runs[0]["devices"] == runs[2]["devices"] else runs[1]
    assert runs[2]["start"] >= same_slot["end"]                    # the third waited for its GPU to free


def test_node_pool_rejects_too_few_devices():
    from hydra_plugins.loragen_launchers.node_pool import slots
    from loragen.errors import ConfigError

    assert slots([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3)]
    with pytest.raises(ConfigError, match=r"devices=\[0\] with gpus_per_job=2: need at least 2 device"):
        slots([0], 2)
    with pytest.raises(ConfigError, match="distinct GPU indices"):
        slots([0, 0], 1)
