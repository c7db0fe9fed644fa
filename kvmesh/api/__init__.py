"""The gRPC API: stubs generated from proto/kvmesh/v1 by `make proto`, committed, drift-checked."""
