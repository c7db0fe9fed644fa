"""Benchmarks: the engine benchmark now; the mesh load generator later."""
