"""kvmesh: a gRPC microservices mesh for disaggregated LLM serving."""

__version__ = "0.1.0"
