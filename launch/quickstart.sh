#!/usr/bin/env bash
# The whole MedCare pipeline on the built-in tiny model and the sample data, 2 CPU ranks:
# tiny model -> stage 1 -> prepare-stage2 -> stage 2 -> export -> evaluation.
# Takes a few minutes on 2 cores (the first DeepSpeed start also builds a small C++ op).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
RANKS="${RANKS:-2}"
OUT=runs/quickstart
rm -rf "$OUT"

python -m medcare_dist tiny-model --out runs/tiny-model
deepspeed --num_gpus "$RANKS" launch/stage1.py --config launch/configs/stage1_tiny.yaml
python -m medcare_dist prepare-stage2 --stage1 "$OUT/stage1/$(cat "$OUT/stage1/latest")" --out "$OUT/stage2-base"
deepspeed --num_gpus "$RANKS" launch/stage2.py --config launch/configs/stage2_tiny.yaml
python -m medcare_dist export --checkpoint "$OUT/stage2/$(cat "$OUT/stage2/latest")" --out "$OUT/final-hf" --dtype fp32
if python -m medcare_dist eval --help >/dev/null 2>&1; then
  python -m medcare_dist eval --model "$OUT/final-hf" --data data/sample/stage2.jsonl data/sample/exam.jsonl --out "$OUT/eval.json"
fi
echo "done: the final Hugging Face model is in $OUT/final-hf"
