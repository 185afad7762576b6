"""autoquant.tasks."""
