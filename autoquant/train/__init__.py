"""autoquant.train."""
