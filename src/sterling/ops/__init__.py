"""Hot ops: one dispatcher per op; ops/reference holds the pure-PyTorch oracles."""
