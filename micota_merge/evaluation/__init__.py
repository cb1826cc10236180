"""Scores through lm-eval: the tasks, the grader, the models, the statistics."""
