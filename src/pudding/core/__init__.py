"""Shared foundations of every stage: loading a model, omitting blocks, the tasks, scoring and metrics."""
