"""gRPC plumbing shared by every service: server bootstrap, channels, errors, auth."""

from kvmesh.rpc.auth import TokenAuthenticator, admin_authenticator, bearer
from kvmesh.rpc.channels import open_channel
from kvmesh.rpc.errors import RpcCallError, from_rpc_error, status_of
from kvmesh.rpc.interceptors import REQUEST_ID_KEY, Authenticator
from kvmesh.rpc.server import RpcServer, ServerConfig, ServiceBinding

__all__ = [
    "REQUEST_ID_KEY",
    "Authenticator",
    "RpcCallError",
    "RpcServer",
    "ServerConfig",
    "ServiceBinding",
    "TokenAuthenticator",
    "admin_authenticator",
    "bearer",
    "from_rpc_error",
    "open_channel",
    "status_of",
]
