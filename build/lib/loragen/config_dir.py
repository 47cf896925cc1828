"""Where loragen's Hydra configs live: the repo's top-level conf/ (editable install) or the copy packaged
inside loragen/ (a built wheel)."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> str:
    here = Path(__file__).resolve().parent
    for cand in (here.parents[1] / "conf", here / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError(f"loragen's conf/ directory was not found next to {here} (expected conf/config.yaml in "
                       f"{here.parents[1] / 'conf'} or {here / 'conf'})")
