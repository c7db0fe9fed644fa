"""Errors of `kvmesh.discovery.registry`.

Each error carries the HTTP status Consul answers with for the same fault, and its message is
the plain-text body Consul sends, so the HTTP layer maps them without a table.

RegistryError                     500
├── BadRequestError               400  malformed body, wrong type, invalid parameter
│   └── UnsupportedError          400  valid for Consul, not served by the embedded registry
├── NotFoundError                 404  unknown service or check id
├── ValueTooLargeError            413  a KV value over 512 KiB
├── UnknownDatacenterError        500  "No path to datacenter", as Consul says it
└── ListenError                   -    an agent could not bind its address
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error raised by the embedded registry."""

    status = 500


class BadRequestError(RegistryError):
    status = 400


class UnsupportedError(BadRequestError):
    """Consul serves this; the embedded registry does not (the message says so)."""


class NotFoundError(RegistryError):
    status = 404


class ValueTooLargeError(RegistryError):
    status = 413


class UnknownDatacenterError(RegistryError):
    def __init__(self, datacenter: str) -> None:
        super().__init__("No path to datacenter")
        self.datacenter = datacenter


class ListenError(RegistryError):
    """An agent's HTTP listener could not be started."""
