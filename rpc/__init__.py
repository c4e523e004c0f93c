"""pallax.rpc."""
