"""pallax.decode."""
