from kvmesh.tiers import Tier
from kvmesh.worker.runtime import main
from services.decode.servicer import binding

main(Tier.DECODE, binding)
