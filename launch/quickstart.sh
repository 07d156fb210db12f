#!/usr/bin/env bash
# The whole MedCare pipeline on the built-in tiny model and the sample data, 2 CPU ranks:
# tiny model (briefly pretrained) -> stage 1 -> prepare-stage2 -> stage 2 -> export, then one
# table comparing the base, the stage-1 checkpoint, the prepared stage-2 base and the final
# model on the sample exam, on held-out conversations and on the stage-1 knowledge data.
# Takes several minutes on 2 cores (the first DeepSpeed start also builds a small C++ op).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
RANKS="${RANKS:-2}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-150}"
OUT=runs/quickstart
rm -rf "$OUT" runs/tiny-model

# a random 2-layer model learns little in a few minutes: pretrain it on the sample dialogues first
python -m medcare_dist tiny-model --out runs/tiny-model --pretrain-steps "$PRETRAIN_STEPS"
deepspeed --num_gpus "$RANKS" launch/stage1.py --config launch/configs/stage1_tiny.yaml
STAGE1="$OUT/stage1/$(cat "$OUT/stage1/latest")"
python -m medcare_dist prepare-stage2 --stage1 "$STAGE1" --out "$OUT/stage2-base"
deepspeed --num_gpus "$RANKS" launch/stage2.py --config launch/configs/stage2_tiny.yaml
python -m medcare_dist export --checkpoint "$OUT/stage2/$(cat "$OUT/stage2/latest")" --out "$OUT/final-hf" --dtype fp32

tables=()
for pair in "base=runs/tiny-model" "stage1=$STAGE1" "stage2-base=$OUT/stage2-base" "final=$OUT/final-hf"; do
  name="${pair%%=*}"
  python -m medcare_dist eval --model "${pair#*=}" --data data/sample/exam.jsonl data/sample/heldout.jsonl data/sample/stage1.jsonl \
    --dtype fp32 --max-length 256 --max-new-tokens 16 --batch-size 16 --out "$OUT/eval-$name.json" > "$OUT/eval-$name.log" 2>&1
  tables+=("$name=$OUT/eval-$name.json")
done
echo
echo "sample exam (accuracy %, 60 questions of 4 options: chance is 25, one standard error about 5.6),"
echo "held-out conversations (loss) and the stage-1 knowledge data (loss; stage 1 trains on it):"
python -m medcare_dist eval-table "${tables[@]}" | tee "$OUT/comparison.txt"
echo "done: the final Hugging Face model is in $OUT/final-hf; per-model reports in $OUT/eval-*.json"
