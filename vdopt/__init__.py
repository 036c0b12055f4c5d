"""vdopt."""
