"""The router: the mesh's `Generation` API; picks workers, streams text, migrates on failure."""
