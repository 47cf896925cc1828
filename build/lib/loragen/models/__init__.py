"""Base models: causal LMs (local dir, Hub id, tiny-from-config) and the packaged MiniLM encoder."""

from loragen.models.registry import LoadedModel, load_model, resolve_model_path

__all__ = ["LoadedModel", "load_model", "resolve_model_path"]
