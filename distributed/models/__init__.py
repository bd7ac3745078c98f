"""Model adapters (one per family), text encoders, VAEs and the tiny-model generator."""
