"""A built wheel runs anywhere: installed into a fresh environment without the source tree on the path."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    # build from a copy of the packaging inputs: setuptools writes build/ next to setup.py, never into the repo
    src = tmp_path / "src-copy"
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)])
    (wheel,) = dist.glob("loragen-*.whl")
    # A fresh venv that sees the dependencies (the test venv's site-packages, added by a .pth file, whose own
    # .pth files, among them the editable install's path to src/, are not processed) but not the source tree.
    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import loragen, loragen.config_dir as c; print(loragen.__file__); print(c.conf_dir())"],
                 cwd=work, env=env).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == str(site / "loragen" / "conf")

    job = _run([str(py), "-m", "loragen", "--cfg", "job", "stage=lora", "model=qwen2.5-0.5b", "dataset=arc_challenge",
                "hardware=a800"], cwd=work, env=env).stdout
    assert "hub_id: Qwen/Qwen2.5-0.5B" in job and "precision: bf16" in job and "name: arc_challenge" in job
    run = work / "run"
    _run([str(py), "-m", "loragen", "stage=lora", "model=tiny_qwen2", "dataset=arc_easy", "tracker=none",
          "train.max_steps=2", "train.per_device_batch=2", "ckpt.every=0", "lora.train_limit=8", "lora.final_eval_limit=4",
          "lora.eval_base=false", f"hydra.run.dir={run}"], cwd=work, env=env)
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "results.json").is_file()


def test_a_user_config_dir_adds_a_model_and_a_dataset_without_forking(tmp_path):
    """--config-dir (Hydra's search path): a new model and a new dataset config next to the packaged ones."""
    from tests.conftest import run_cli

    user = tmp_path / "my-conf"
    (user / "model").mkdir(parents=True)
    (user / "dataset").mkdir()
    (user / "model" / "my_qwen.yaml").write_text("defaults:\n  - qwen2.5-0.5b\n  - _self_\nname: my_qwen\n"
                                                 "hub_id: my-org/my-qwen-finetune\n")
    (user / "dataset" / "my_arc.yaml").write_text("defaults:\n  - arc_easy\n  - _self_\nname: my_arc\n"
                                                  "eval_split: validation\n")
    out = run_cli(["--config-dir", str(user), "--cfg", "job", "stage=lora", "model=my_qwen", "dataset=my_arc"],
                  cwd=tmp_path).stdout
    assert "hub_id: my-org/my-qwen-finetune" in out and "name: my_qwen" in out
    assert "name: my_arc" in out and "eval_split: validation" in out and "path: allenai/ai2_arc" in out
