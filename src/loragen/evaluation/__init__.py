"""Multiple-choice scoring and metrics: the one scorer every stage uses."""
