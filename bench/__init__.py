"""pallax.bench."""
