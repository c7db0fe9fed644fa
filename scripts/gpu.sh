#!/usr/bin/env bash
# The GPU checks of the engine, in stages, for a lent GPU machine (see docs/engines.md):
#   scripts/gpu.sh STAGE...   with STAGE in: kernels profile engine sync baseline accuracy gputests
#                                           mesh secure fp8 speculation
# Results go to $OUT (default ./gpu-out). Wheels the machine lacks are installed from .whl/ if
# present; a real SmolLM2 GGUF at $KVMESH_GGUF is used for accuracy checks, else dummy weights.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && [ ! -f "/tmp/site/.done-$(basename "$WHEELS")" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && touch "/tmp/site/.done-$(basename "$WHEELS")"
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
KV="python3 -m kvmesh.cli"
MODEL=dummy:llama-3.1-8b
run() { echo "== $*"; local t=$SECONDS; "$@"; echo "== rc=$? ${*:1:3} took $((SECONDS - t))s"; }
for stage in "$@"; do
  case $stage in
    kernels)
      run python3 -m pytest -q -x tests/gpu/test_triton_kernels.py -p no:cacheprovider 2>&1 | tail -15
      run python3 -m kvmesh.bench.kernels --device cuda --json-out "$OUT/kernels.json" ;;
    profile)
      run python3 -m kvmesh.bench.profile --batch 32 --context 512 2>&1 | grep -v "^-*$" | cut -c1-160 ;;
    engine)
      run $KV bench-engine --gpu --model $MODEL --device cuda --json-out "$OUT/bench-engine.json" ;;
    sync)  # the same engine with synchronous steps: what async scheduling gains
      run $KV bench-engine --gpu --model $MODEL --device cuda --no-async-scheduling \
        --batches 1,32,64 --long-batch 0 --transformers-batch 0 \
        --json-out "$OUT/bench-engine-sync.json" ;;
    baseline)  # the engine as it was: gather + SDPA, no CUDA graphs, plain PyTorch ops
      run $KV bench-engine --gpu --model $MODEL --device cuda --attention-backend sdpa \
        --no-cuda-graphs --batches 1,32 --long-batch 0 --transformers-batch 0 \
        --json-out "$OUT/bench-engine-sdpa.json" ;;
    accuracy)
      spec=${KVMESH_GGUF:-dummy:smollm2-135m}
      for backend in sdpa paged triton; do
        run $KV check-accuracy --model "$spec" --device cuda --attention-backend $backend \
          --fp32-reference --greedy-tokens 16 --json-out "$OUT/accuracy-$backend.json"
      done ;;
    gputests)
      KVMESH_REPORT_DIR=$OUT KVMESH_GPU_MODEL=${KVMESH_GGUF:-smollm2} \
        run python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -25 ;;
    mesh)
      for variant in baseline default; do
        extra=()
        [ $variant = baseline ] && extra=(--worker-arg=--attention-backend --worker-arg=sdpa \
          --worker-arg=--no-cuda-graphs)
        run $KV bench-mesh --model $MODEL --device cuda --num-blocks 2048 --prompt-tokens 1024 \
          --max-tokens 32 --requests 20 "${extra[@]}" --json-out "$OUT/mesh-$variant.json"
      done ;;
    secure)  # what `kvmesh up --secure` (mutual TLS and the rest) costs: TTFT and ITL ratios
      run $KV bench-mesh --model $MODEL --device cuda --num-blocks 2048 --prompt-tokens 1024 \
        --max-tokens 32 --requests 20 --secure-vs-plain --rounds 2 \
        --json-out "$OUT/mesh-secure-vs-plain.json" ;;
    fp8)  # FP8 KV: the transfer beside bf16 (VRAM -> VRAM), and the FP8 cache's quality
      run python3 -m kvmesh.bench.transfer --num-tokens 4096 --shape llama8b --device cuda:0 \
        --transfer-dtype fp8_e4m3 --repeats 20 > "$OUT/transfer-llama8b-fp8.json"
      tail -22 "$OUT/transfer-llama8b-fp8.json"
      run python3 -m kvmesh.bench.kv_dtype --model "${KVMESH_GGUF:-dummy:smollm2-135m}" \
        --device cuda --prompts 20 --max-tokens 32 --json-out "$OUT/kv-dtype.json" | tail -25
      KVMESH_REPORT_DIR=$OUT run python3 -m pytest -q -x tests/unit/kv tests/unit/engine \
        -k "fp8 or quant or convert or kv_dtype" -p no:cacheprovider 2>&1 | tail -5 ;;
    speculation)  # n-gram drafts vs plain decoding (and an oracle's drafts) at batch 1 and 16
      run python3 -m pytest -q tests/gpu/test_cuda_engine.py -k speculative -p no:cacheprovider \
        2>&1 | tail -5
      run $KV bench-speculation --model $MODEL --device cuda --prompt-len 1024 --max-tokens 256 \
        --rounds 3 --json-out "$OUT/bench-speculation.json"
      # Acceptance and the speed-up need real weights (dummy ones give near-flat distributions
      # whose near-ties the verify and decode kernels resolve apart): SmolLM2's code edits.
      if [ -n "${KVMESH_GGUF:-}" ]; then
        run $KV bench-speculation --model "$KVMESH_GGUF" --device cuda --max-tokens 96 \
          --functions 4 --rounds 3 --json-out "$OUT/bench-speculation-smollm2.json"
      fi ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
