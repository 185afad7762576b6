"""autoquant.transform."""
