"""`make bench` / `python -m loragen.bench [name ...]`: benchmarks that print ratios against a reference.

Each module `loragen.bench.<name>` exposes `run() -> dict` returning at least
{"name", "metric", "loragen", "reference", "ratio", "target", "notes"}.
"""
