"""autoquant.measure."""
