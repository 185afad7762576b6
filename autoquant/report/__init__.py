"""autoquant.report."""
