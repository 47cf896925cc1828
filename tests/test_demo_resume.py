"""`make demo RUN_DIR=<dir> ARGS=...`: the demo in a run dir of one's choosing, resumed by the same command.

make runs with this interpreter's environment as its VENV and `-o <VENV>/.installed` (make's "old file": never
rebuilt), so a test never reinstalls the package, whatever the stamp's age against setup.cfg.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

VENV = Path(sys.prefix)
pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="no make"),
    pytest.mark.skipif(not (VENV / "bin" / "loragen").is_file(), reason=f"no loragen script in {VENV}/bin"),
]


def make(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    # under `make test` this make is a sub-make: without the parent's MAKEFLAGS/MAKELEVEL (and with
    # --no-print-directory) it prints no "make[1]: Entering directory" lines around the commands
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-o", f"{VENV}/.installed", *args, f"VENV={VENV}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_command_lines():
    default = make("-n", "demo")
    assert default.returncode == 0, default.stderr
    assert default.stdout.strip() == f"{VENV}/bin/loragen experiment=dnd_minilm"  # as before RUN_DIR existed
    given = make("-n", "demo", "RUN_DIR=/tmp/demo run", "ARGS=+debug=tiny seed=1")
    assert given.stdout.strip() == f'{VENV}/bin/loragen experiment=dnd_minilm "hydra.run.dir=/tmp/demo run" +debug=tiny seed=1'


def test_make_test_leaves_out_slow_and_gpu_tests():
    assert '-m "not slow and not gpu"' in make("-n", "test").stdout


@pytest.mark.slow  # two runs of the tiny dnd pipeline through make: about 75 s of CPU (3 min on a loaded machine)
def test_demo_rerun_in_the_same_run_dir_skips_every_step(tmp_path):
    run = tmp_path / "demo"
    args = ["demo", f"RUN_DIR={run}", f"ARGS=+debug=tiny paths.cache_dir={tmp_path / 'cache'}"]
    first = make(*args)
    assert first.returncode == 0, first.stderr[-4000:]
    steps = json.loads((run / "table.json").read_text())["steps"]
    assert len(steps) >= 9 and {s["status"] for s in steps.values()} == {"done"}
    again = make(*args)
    assert again.returncode == 0, again.stderr[-4000:]
    log = again.stdout + again.stderr
    assert log.count("skipped (done") == len(steps), log[-4000:]
    assert "running in" not in log
    assert {s["status"] for s in json.loads((run / "table.json").read_text())["steps"].values()} == {"skipped"}
