"""Packaging glue: setup.cfg holds the metadata; this only carries conf/ into every built package.

`conf/` stays the top-level folder users read and edit. A wheel (or `pip install .`) copies it to
`loragen/conf`, where `loragen.config_dir.conf_dir()` looks when the repo's conf/ is not next to the code.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "conf"
        dst = Path(self.build_lib) / "loragen" / "conf"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})
