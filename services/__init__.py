"""kvmesh services: one package per service, each run as `python -m services.<name>`."""
