from kvmesh.tiers import Tier
from kvmesh.worker.runtime import main
from services.prefill.servicer import binding

main(Tier.PREFILL, binding)
