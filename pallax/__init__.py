import pallax
