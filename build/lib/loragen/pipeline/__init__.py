"""Pipelines: a recipe's steps (each a stage run with its own overrides), skipped when done, rerun when changed."""
