"""Generated gRPC stubs of kvmesh.v1."""
