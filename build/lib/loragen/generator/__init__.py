"""Prompt-to-weights: the training data of the HyperConv generator, its baselines and its checkpoint."""
