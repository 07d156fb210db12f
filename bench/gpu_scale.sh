#!/usr/bin/env bash
# The real launcher at 7B on one GPU: plain LoRA, stage 1, stage 2 in one run (issue 20).
#
#   bash bench/gpu_scale.sh --out runs/gpu_scale            # one GPU, sized for <= 10 minutes
#   bash bench/gpu_scale.sh --dry-run --out /tmp/gs         # CPU, tiny model, 3 steps: checks the script
#
# Each run goes through `deepspeed --num_gpus 1` (ZeRO-3, bf16) on a random-weight base of
# Qwen2.5-7B's shapes written layer by layer as safetensors (no model built), sequence 4096,
# packed where flash-attn is importable, else padded: bench/lora_baseline.py (plain LoRA on
# attention + FFN), launch/stage1.py, then prepare-stage2 and launch/stage2.py. It prints
# tokens/s, MFU, peak GPU memory beside `medcare-dist plan`'s estimate and the ratios
# stage1/lora, stage2/lora, and writes OUT/gpu_scale.json. The FLOPs per token and every
# step are documented in bench/gpu_scale.py. Options: python bench/gpu_scale.py --help.
#
# PEAK_FLOPS: the GPU's dense bf16 peak, MFU's denominator (989e12: H100 / H200 SXM).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEAK_FLOPS="${PEAK_FLOPS:-989e12}"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
done
exec python "$HERE/gpu_scale.py" --peak-flops "$PEAK_FLOPS" "$@"
