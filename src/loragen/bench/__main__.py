"""Run the benchmarks, print a table, write bench/results.json and bench/results.md.

A benchmark is a module of loragen.bench with a `run()` returning rows (name, metric, loragen, reference,
ratio, ...). `scaling` has none: it estimates GPU resources from model shapes and runs on its own.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

import loragen.bench as pkg
from loragen import io
from loragen.provenance import git_sha


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: a bench ratio is only comparable with one measured under similar load."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def busy(before: list[float] | None, after: list[float] | None, cores: int | None) -> bool:
    """True when the 1-minute load before or after a benchmark exceeded the core count."""
    return any(v is not None and cores and v[0] > cores for v in (before, after))


def cpu_seconds() -> tuple[float, float] | None:
    """(all processes' busy CPU seconds from /proc/stat, this process's and its children's): their difference over a
    benchmark is what others ran meanwhile. The load average cannot tell: it counts the benchmark's own threads."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    own = sum(os.times()[:4])
    return (sum(fields[:8]) - idle) / ticks, own


def others_cores(start: tuple[float, float] | None, end: tuple[float, float] | None, wall: float) -> float | None:
    """The mean number of cores other processes kept busy between two `cpu_seconds` readings."""
    if start is None or end is None or wall <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall)


OTHERS_BUSY = 0.25  # cores: above it, others ran beside the benchmark and its ratios are not a quiet machine's


def benchmarks() -> list[str]:
    """The names of the modules of loragen.bench that define run()."""
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [n for n in names if callable(getattr(importlib.import_module(f"loragen.bench.{n}"), "run", None))]


def main(argv: list[str], out: Path = Path("bench")) -> None:
    known = benchmarks()
    unknown = [n for n in argv if n not in known]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {known}")
    names = argv or known
    results = []
    for name in names:
        t0 = time.perf_counter()
        load0, cpu0 = load_average(), cpu_seconds()
        print(f"== bench {name} (load average {load0})", flush=True)
        rows = importlib.import_module(f"loragen.bench.{name}").run()
        load1, cpu1 = load_average(), cpu_seconds()
        others = others_cores(cpu0, cpu1, time.perf_counter() - t0)
        for row in rows if isinstance(rows, list) else [rows]:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["load_before"], row["load_after"] = load0, load1
            row["others_cores"] = None if others is None else round(others, 2)
            if others is not None and others > OTHERS_BUSY:
                row["notes"] = (row.get("notes", "") + f" BUSY: other processes used {others:.2f} cores").strip()
            elif others is None and busy(load0, load1, os.cpu_count()):
                row["notes"] = (row.get("notes", "") + " BUSY: load above the core count").strip()
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": machine(), "git_sha": git_sha(), "results": results}
    io.write_json(out / "results.json", report)
    lines = [f"Machine: {report['machine']}; commit {report['git_sha']}", "",
             "| benchmark | metric | loragen | reference | ratio | target | load (1 min) before/after | others' cores | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = "/".join("?" if v is None else f"{v[0]:.2f}" for v in (r["load_before"], r["load_after"]))
        others = "?" if r.get("others_cores") is None else f"{r['others_cores']:.2f}"
        lines.append(f"| {r['name']} | {r['metric']} | {r['loragen']:.4g} | {r['reference']:.4g} | {r['ratio']:.2f} | "
                     f"{r.get('target', '')} | {load} | {others} | {r.get('notes', '')} |")
    io.write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
