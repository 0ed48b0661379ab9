"""evomerge."""
