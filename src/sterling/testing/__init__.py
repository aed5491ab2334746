"""Fixtures shared by tests and benchmarks: synthetic embeddings and synthetic served snapshots."""
