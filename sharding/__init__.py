"""pallax.sharding."""
