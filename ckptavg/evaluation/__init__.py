"""Scoring checkpoints with lm-evaluation-harness: the tasks (tasks), one checkpoint's scores (harness),
which checkpoints to score (targets), and the loop into the results store (scorer)."""
