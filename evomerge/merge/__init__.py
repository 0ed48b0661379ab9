"""Checkpoint I/O, layer mapping, parameter resolution, merge kernels and the in-memory materializer."""
