"""Training loops, losses and metrics."""
