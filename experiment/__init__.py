"""Launching and recording experiments: the CLI, config saving and the W&B logger."""
