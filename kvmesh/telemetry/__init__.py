"""Logging (and, with the services, metrics) configured once per process."""

from kvmesh.telemetry.logging import configure_logging

__all__ = ["configure_logging"]
