import asyncio

from kvmesh.telemetry import configure_logging
from services.router import args
from services.router.main import run_router

config, log_level = args.parse()
configure_logging(log_level, service="kvmesh-router")
asyncio.run(run_router(config))
