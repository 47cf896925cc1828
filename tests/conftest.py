import os
import subprocess
import sys
from pathlib import Path

import pytest

import loragen  # noqa: F401  (registers the typed config schemas before any compose)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = (ROOT / ".." / "shared" / "data" / "commonsense").resolve()

os.environ.setdefault("LORAGEN_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("SWANLAB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA_DIR = os.environ["LORAGEN_DATA_DIR"]


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not Path(DATA_DIR).is_dir():
        pytest.fail(f"LORAGEN_DATA_DIR={DATA_DIR} does not exist")
    return DATA_DIR


@pytest.fixture(scope="session")
def paths(tmp_path_factory):
    from omegaconf import OmegaConf

    cache = os.environ.get("LORAGEN_CACHE_DIR") or str(Path.home() / ".cache" / "loragen")
    return OmegaConf.create({"data_dir": DATA_DIR, "models_dir": None, "cache_dir": cache})


def compose(overrides: list[str] | None = None):
    """The composed config, as the CLI would build it (no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, check: bool = True, timeout: int = 900):
    """Run `python -m loragen <args>` in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "loragen", *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"loragen {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_stage_in_process(overrides: list[str], run_dir=None) -> dict:
    """Run a stage in this process as the CLI would (job config, Hydra run dir), without its start-up cost.

    `run_dir` defaults to the composed `hydra.run.dir`. Hydra's global config is cleared afterwards so
    that no later test sees this run's directory.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from loragen.stages import run_stage

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    out = Path(run_dir) if run_dir is not None else Path(cfg.hydra.run.dir)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]  # the job config, as @hydra.main hands it to the CLI
        return run_stage(cfg)
    finally:
        HydraConfig.instance().cfg = None
