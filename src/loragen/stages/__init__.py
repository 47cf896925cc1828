"""One module per stage, each exposing `run(cfg) -> dict` (a recipe: setup, loop, save)."""
