"""The edge: an OpenAI-compatible HTTP/SSE front door that forwards to the router over gRPC.

Run it with `python -m services.edge` (see README.md); start it inside a test's event loop with
`serve_in_background(config, channel)`.
"""

from services.edge.app import create_app
from services.edge.args import EdgeConfig, parse_args
from services.edge.client import GenerationClient
from services.edge.clusters import Cluster, ClusterSet
from services.edge.server import RunningEdge, serve, serve_in_background

__all__ = [
    "Cluster",
    "ClusterSet",
    "EdgeConfig",
    "GenerationClient",
    "RunningEdge",
    "create_app",
    "parse_args",
    "serve",
    "serve_in_background",
]
