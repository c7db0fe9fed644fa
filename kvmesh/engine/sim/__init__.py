"""The simulated engine (`--engine sim`): real bookkeeping, a GPU's timing, no tensors.

In the spirit of NVIDIA Dynamo's mocker: the worker, its services, the router and the
autoscaler see an engine that behaves like a GPU serving a real model, while nothing but time
is computed, so dozens of workers fit on a laptop. It is the same `EngineCore` as the torch
engine — real scheduling and chunked prefill, a real block pool and prefix cache, real KV
events and exports — over an executor (`executor.SimExecutor`) that sleeps for the step time a
GPU would take and emits pseudo-random token ids. It imports no torch.

    python -m services.prefill --engine sim --model dummy:llama-3.1-8b \\
        --engine-arg gpu=H100 --engine-arg speed=10

The step-time model (`timing`): a roofline of the named GPU over the model's shape
(`kvmesh.models.read_model_config`). Prefill: max(FLOPs / (peak × prefill efficiency), bytes /
(HBM bandwidth × decode efficiency)), FLOPs counting the matmuls (2 × parameters per token, the
embedding lookup excluded, the LM head only for rows that sample) and causal attention over each
chunk's context. Decode: (weights + the KV of every sequence's context) / (HBM bandwidth ×
decode efficiency). A mixed step adds both, reading the weights once. Every step adds a fixed
overhead.

The constants (`gpus.CALIBRATION`, one row per GPU) are fitted to kvmesh's torch engine as
measured on H100s (Llama-3.1-8B bf16, triton backend, CUDA graphs, async scheduling,
2026-12-07): prefill at 0.63 of the bf16 peak, decode at 0.79 of HBM bandwidth, 0.7 ms per
step, which reproduce the measured prefill (42.9-44.9k tokens/s for 2048 tokens) and decode
steps (6.3 ms at batch 1 to 12.4 ms at batch 32, context 4096) within 4%. Small prefill chunks
over a long cached prefix come out faster than measured (12.9 ms against 14.3-14.7 ms for 512
new tokens over 1,536): the per-step CPU work a long chunk hides is not modelled. `gpus.py`
has the details.
Datasheet peaks: H100 989 TFLOP/s, 3.35 TB/s, 80 GB; H200 989 TFLOP/s, 4.8 TB/s, 141 GB; A100
312 TFLOP/s, 2.04 TB/s, 80 GB; L40S 362 TFLOP/s, 0.86 TB/s, 48 GB.

Options (`--engine-arg KEY=VALUE`, `options.SimOptions`): `gpu` (H100), `speed` (1; 10 runs ten
times faster than the GPU would), `noise` (0; relative std-dev of lognormal noise per step),
`seed`, `num_blocks` (else `--num-blocks`, else (GPU memory − weights) × `mem_fraction` 0.9),
`link_gbps` (50 GB/s: the ENGINE-mode KV link), `prefill_eff`, `decode_eff`, `overhead_ms`.

KV moves with `TransferMode.ENGINE`: the export's opaque state is a small JSON document
(`kvmesh-sim/v1`: exporter, model, tokens, block size, bytes); the importer accepts only a sim
export of the same model and block size and sleeps for the bytes over the link. Its layout
fingerprint starts with `kvmesh-sim/v1`, so torch workers refuse sim handles and vice versa.

What it does NOT model: no tensors and no numerical content (token ids are pseudo-random and
never EOS; logprobs are fixed), no NIXL and no real transfer, no memory beyond the block count,
no tensor/pipeline parallelism, no CUDA graphs or kernel choice, no interference between a
worker's transfers and its steps; the CPU cost of the Python around each step is real.
"""

from kvmesh.engine.sim.engine import SimCore, SimEngine

__all__ = ["SimCore", "SimEngine"]
