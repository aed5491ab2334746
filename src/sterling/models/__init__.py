"""User and item towers."""
