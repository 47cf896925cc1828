"""Run the benchmarks, print a table, write bench/results.json and bench/results.md."""

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


def main(argv: list[str]) -> None:
    names = argv or sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    results = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== bench {name}", flush=True)
        rows = importlib.import_module(f"loragen.bench.{name}").run()
        for row in rows if isinstance(rows, list) else [rows]:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    out = Path("bench")
    out.mkdir(exist_ok=True)
    report = {"machine": machine(), "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Machine: {report['machine']}", "", "| benchmark | metric | loragen | reference | ratio | target | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['metric']} | {r['loragen']:.4g} | {r['reference']:.4g} | {r['ratio']:.2f} | "
                     f"{r.get('target', '')} | {r.get('notes', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
