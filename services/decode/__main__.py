from kvmesh.worker.runtime import main
from services.decode.servicer import binding

main("decode", binding)
