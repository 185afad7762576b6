"""autoquant.space."""
