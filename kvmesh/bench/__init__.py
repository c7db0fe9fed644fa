"""Benchmarks: engine, accuracy, registry, mesh, KV transfer, routing, and the load generator
(`kvmesh.bench.load`, the `kvmesh bench` command) that measures any OpenAI-compatible server."""
