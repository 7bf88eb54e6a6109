"""Training loops, checkpoints and distributed helpers."""
