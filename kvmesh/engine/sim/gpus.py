"""The GPUs the sim engine can play: datasheet peaks, and the one calibration table.

`GPUS` holds what the vendor prints (dense BF16 tensor TFLOP/s without sparsity, HBM TB/s,
memory); `CALIBRATION` holds what a real engine reaches of those peaks, per GPU. Change a
calibration row here and nowhere else; `--engine-arg prefill_eff=/decode_eff=/overhead_ms=`
overrides one worker's row for experiments.

Where the numbers come from (see also the package docstring):

- Datasheets: H100 SXM5 80 GB, H200 SXM 141 GB, A100 SXM4 80 GB, L40S 48 GB (NVIDIA).
- Calibration: kvmesh's torch engine as measured in this project on H100 80GB HBM3 hosts
  (2026-12-07, `kvmesh bench-engine --gpu --model dummy:llama-3.1-8b`: triton backend, CUDA
  graphs, async scheduling, bf16; two runs, docs/results/h100-llama8b-bench-engine-{5,6}.json):
  prefill of 2048 tokens 42,900-44,900 tokens/s; decode steps at context 512 of 6.28 ms
  (batch 1), 7.46-7.47 ms (batch 32), 8.23-8.24 ms (batch 64), and 12.44-12.45 ms at context
  4096, batch 32. The H100 row (prefill at 0.63 of the bf16 peak, decode at 0.79 of HBM
  bandwidth, 0.7 ms per step) reproduces those within 4%. It does not capture small prefill
  chunks as well: a 512-token chunk over a 1,536-token cached prefix took 14.3-14.7 ms, the
  model says 12.9 ms. The other GPUs take the H100's efficiencies until they are measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_bf16_flops: float  # dense tensor-core FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class Calibration:
    prefill_efficiency: float  # fraction of the peak FLOP/s a prefill chunk reaches
    decode_efficiency: float  # fraction of the HBM bandwidth a memory-bound step reaches
    step_overhead_s: float  # per step: scheduling, launches, sampling
    source: str


GB = 10**9

GPUS: dict[str, GpuSpec] = {
    "H100": GpuSpec("H100", 989.4e12, 3.35e12, 80 * GB),
    "H200": GpuSpec("H200", 989.4e12, 4.8e12, 141 * GB),
    "A100": GpuSpec("A100", 312e12, 2.039e12, 80 * GB),
    "L40S": GpuSpec("L40S", 362.05e12, 0.864e12, 48 * GB),
}

_H100 = "kvmesh torch engine on an H100, 2026-12-07 (see above)"
_UNMEASURED = "the H100's efficiencies, not measured on this GPU"

CALIBRATION: dict[str, Calibration] = {
    "H100": Calibration(0.63, 0.79, 0.7e-3, _H100),
    "H200": Calibration(0.63, 0.79, 0.7e-3, _UNMEASURED),
    "A100": Calibration(0.63, 0.79, 0.7e-3, _UNMEASURED),
    "L40S": Calibration(0.63, 0.79, 0.7e-3, _UNMEASURED),
}
