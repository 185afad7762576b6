"""autoquant.search."""
