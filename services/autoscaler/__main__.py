import asyncio

from kvmesh.telemetry import configure_logging
from services.autoscaler.main import parse, run_autoscaler

config, log_level = parse()
configure_logging(log_level, service="kvmesh-autoscaler")
asyncio.run(run_autoscaler(config))
