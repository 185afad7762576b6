"""autoquant.quant."""
