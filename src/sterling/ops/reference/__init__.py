"""Pure-PyTorch reference implementations (the oracles every fast path is tested against)."""
