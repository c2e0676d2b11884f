"""Downstream tasks through lm-evaluation-harness: which tasks (checked before any work),
and scoring a model, live or on disk, with the harness's own metrics. Knows nothing of Ray."""
