"""pallax.finetune."""
