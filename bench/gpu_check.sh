#!/usr/bin/env bash
# What we run on a lent GPU machine (one H200, no network, the image's python3 with torch):
# install the few missing packages from carried wheels (.wheels/, see docs/benchmarks.md),
# measure training throughput, then a bf16 DeepSpeed ZeRO-3 run of both stages on the tiny model.
#   OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --find-links .wheels --no-build-isolation datasets deepspeed hjson pydantic 2>&1 | tail -3
python3 -c "import torch, transformers, deepspeed, datasets, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)"
for model in qwen1.5-1.8b qwen1.5-7b; do
  timeout 240 python3 bench/gpu_throughput.py --model $model --seq-len 2048 --micro-batch 4 --grad-ckpt --json "$OUT/throughput_$model.json" 2>&1 | grep -v Warning | tee -a "$OUT/throughput.txt"
done
python3 -m medcare_dist tiny-model --out /tmp/tiny > /dev/null
common="--data data/sample/stage1.jsonl --max_steps 20 --log_every 5 --global_batch_size 8 --micro_batch_size 4 --max_length 256 --lr 5e-3 --dtype bf16"
timeout 200 deepspeed --num_gpus 1 launch/stage1.py --model /tmp/tiny --output_dir /tmp/s1 $common 2>&1 | grep -E "^step|error|Error|saved" | tee "$OUT/bf16_pipeline.txt"
python3 -m medcare_dist prepare-stage2 --stage1 /tmp/s1/checkpoint-20 --out /tmp/s2base 2>&1 | tail -1 | tee -a "$OUT/bf16_pipeline.txt"
timeout 200 deepspeed --num_gpus 1 launch/stage2.py --model /tmp/s2base --output_dir /tmp/s2 ${common/stage1/stage2} 2>&1 | grep -E "^step|error|Error|saved" | tee -a "$OUT/bf16_pipeline.txt"
cp /tmp/s1/metrics.jsonl "$OUT/stage1_metrics.jsonl" 2>/dev/null; cp /tmp/s2/metrics.jsonl "$OUT/stage2_metrics.jsonl" 2>/dev/null
