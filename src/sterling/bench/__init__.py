"""Benchmarks: each compares sterling with its named peers in one run and writes JSON."""
