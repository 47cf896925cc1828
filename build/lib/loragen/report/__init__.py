"""Reports: what the runs recorded, as report.md with PNG plots (stage=report)."""
