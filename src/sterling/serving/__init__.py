"""Snapshots (publish / verify / load) and, later, the served model."""
