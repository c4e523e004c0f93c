"""pallax.kernels_pallas."""
