import asyncio
import sys

from kvmesh.discovery import DiscoveryError
from kvmesh.telemetry import configure_logging
from services.controlplane.actuator import ActuatorError
from services.controlplane.main import parse, run_controlplane

config, log_level = parse()
configure_logging(log_level, service="kvmesh-controlplane")
try:
    asyncio.run(run_controlplane(config))
except (ActuatorError, DiscoveryError) as e:  # no credentials, no registry: say so, no trace
    print(f"controlplane: {e}", file=sys.stderr)
    sys.exit(1)
