from kvmesh.worker.runtime import main
from services.prefill.servicer import binding

main("prefill", binding)
