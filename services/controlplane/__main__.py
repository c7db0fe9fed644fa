import asyncio

from kvmesh.telemetry import configure_logging
from services.controlplane.main import parse, run_controlplane

config, log_level = parse()
configure_logging(log_level)
asyncio.run(run_controlplane(config))
