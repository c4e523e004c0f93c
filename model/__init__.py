"""pallax.model."""
