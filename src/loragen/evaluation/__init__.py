"""Multiple-choice scoring and metrics: the one scorer every stage uses."""

from loragen.evaluation.evaluator import EvalOutcome, evaluate_records

__all__ = ["EvalOutcome", "evaluate_records"]
