"""Evaluation: the one multiple-choice scorer, and generation with text metrics for prompt -> text data."""

from loragen.evaluation.evaluator import EvalOutcome, evaluate_records
from loragen.evaluation.generation import GenerationSettings, generate_texts
from loragen.evaluation.text_evaluator import TextEvalOutcome, evaluate_texts

__all__ = ["EvalOutcome", "evaluate_records", "GenerationSettings", "generate_texts", "TextEvalOutcome", "evaluate_texts"]
