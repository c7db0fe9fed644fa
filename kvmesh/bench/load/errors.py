"""The load generator's errors, one tree, so callers catch `BenchError` and nothing else.

BenchError                 anything the load generator refuses or cannot do
├── ConfigError            the configuration is inconsistent (a usage error on the CLI)
└── TargetError            the server answered something the generator cannot use
    ├── TargetUnreachableError   no connection could be made (checked before the run)
    └── RequestFailedError       one request failed; recorded, the run goes on
"""

from __future__ import annotations


class BenchError(Exception):
    """Base of every error the load generator raises."""


class ConfigError(BenchError):
    """The configuration cannot describe a run (negative rate, two arrival modes, ...)."""


class TargetError(BenchError):
    """The server was reached but its answer cannot be used (no models listed, bad JSON)."""


class TargetUnreachableError(TargetError):
    """No connection to the server: raised before any load is sent."""


class RequestFailedError(TargetError):
    """One request failed (an HTTP or gRPC error, an error event, a truncated stream)."""
