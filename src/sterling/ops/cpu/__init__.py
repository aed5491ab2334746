"""CPU fast paths (pure torch or native) behind the dispatchers in sterling.ops."""
