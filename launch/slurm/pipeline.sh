#!/usr/bin/env bash
# The whole MedCare pipeline as four SLURM jobs, each one starting only when the one before
# it succeeded (sbatch --dependency=afterok):
#
#   stage 1 (stage1.sbatch) -> prepare-stage2 (1 task) -> stage 2 (stage2.sbatch) -> export
#
#   bash launch/slurm/pipeline.sh                     (from the repository root, on a login node)
#   NODES=4 RUN_DIR=runs/14b bash launch/slurm/pipeline.sh
#
# It prints the four job ids and returns at once (WAIT=1: blocks until the export job ends
# and exits with its status). If a job fails, SLURM cancels the jobs after it
# (--kill-on-invalid-dep=yes). Logs: $RUN_DIR/logs/<job name>-<job id>.out. The run
# directory must be new (prepare-stage2 and export refuse to overwrite).
#
# ======================= user settings (environment variables of the same name override) ====
NODES=${NODES:-2}                        # nodes for each training stage
GPUS_PER_NODE=${GPUS_PER_NODE:-8}        # GPUs per node (0: a CPU-only cluster)
TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}   # ranks per node: one per GPU
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
STAGE1_CONFIG=${STAGE1_CONFIG-launch/configs/stage1_qwen7b.yaml}
STAGE2_CONFIG=${STAGE2_CONFIG-launch/configs/stage2_qwen7b.yaml}
STAGE1_ARGS=${STAGE1_ARGS:-}             # extra `--key value` options for stage 1 (not --output_dir, --timeout_minutes)
STAGE2_ARGS=${STAGE2_ARGS:-}             # ... for stage 2
RUN_DIR=${RUN_DIR:-runs/medcare}         # stage1/, stage2-base/, stage2/, final/, logs/
STAGE1_TIME=${STAGE1_TIME:-48:00:00}
STAGE2_TIME=${STAGE2_TIME:-24:00:00}
PREP_TIME=${PREP_TIME:-4:00:00}          # prepare-stage2 and export: one process, CPU + RAM
PREP_CPUS=${PREP_CPUS:-8}
PREP_MEM=${PREP_MEM:-64G}
TIMEOUT_MINUTES=${TIMEOUT_MINUTES:-30}   # collective timeout of the training stages
SBATCH_ARGS=${SBATCH_ARGS:-}             # for every job, e.g. "--partition=gpu --account=myproject"
REPO=${REPO:-$PWD}
VENV=${VENV:-$REPO/.venv}
WAIT=${WAIT:-0}                          # 1: wait for the last job, exit with its status
DRY_RUN=${DRY_RUN:-0}                    # 1: print the sbatch commands, submit nothing
# ======================= end of user settings ================================================

set -euo pipefail
cd "$REPO"
here=launch/slurm
RUN_DIR=$(realpath -m "$RUN_DIR")
if [ "$DRY_RUN" != 1 ]; then mkdir -p "$RUN_DIR/logs"; fi

# shellcheck disable=SC2206  # SBATCH_ARGS is a list of words
common=(--parsable --output="$RUN_DIR/logs/%x-%j.out" $SBATCH_ARGS)
train=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK")
single=(--nodes=1 --ntasks=1 --cpus-per-task="$PREP_CPUS" --mem="$PREP_MEM" --time="$PREP_TIME")

submit() {  # submit [sbatch options...] [script]; a script on stdin when none is given
  if [ "$DRY_RUN" = 1 ]; then
    local name=job a
    for a in "$@"; do case $a in --job-name=*) name=${a#--job-name=} ;; esac; done
    echo "${CONFIG+CONFIG=$CONFIG }${MODEL+MODEL=$MODEL }${OUTPUT_DIR+OUTPUT_DIR=$OUTPUT_DIR }${EXTRA_ARGS:+EXTRA_ARGS=\"$EXTRA_ARGS\" }sbatch ${common[*]} $*" >&2
    [ -t 0 ] || sed 's/^/    | /' >&2
    echo "dry-$name"
  else
    sbatch "${common[@]}" "$@" | cut -d';' -f1
  fi
}

after() { echo "--dependency=afterok:$1 --kill-on-invalid-dep=yes"; }

one_task_job() {  # the body of a one-process job (prepare-stage2, export)
  cat <<EOF
#!/usr/bin/env bash
set -euo pipefail
cd "$REPO"
if [ -f "$VENV/bin/activate" ]; then . "$VENV/bin/activate"; fi
$1
EOF
}

s1=$(CONFIG="$STAGE1_CONFIG" OUTPUT_DIR="$RUN_DIR/stage1" EXTRA_ARGS="$STAGE1_ARGS" TIMEOUT_MINUTES="$TIMEOUT_MINUTES" REPO="$REPO" VENV="$VENV" \
  submit --job-name=medcare-stage1 "${train[@]}" --time="$STAGE1_TIME" $here/stage1.sbatch </dev/null)

# `latest` in an output dir names its newest complete checkpoint.
# shellcheck disable=SC2046
prep=$(one_task_job "medcare-dist prepare-stage2 --stage1 \"$RUN_DIR/stage1/\$(cat \"$RUN_DIR/stage1/latest\")\" --out \"$RUN_DIR/stage2-base\"" |
  submit --job-name=medcare-prepare "${single[@]}" $(after "$s1"))

# shellcheck disable=SC2046
s2=$(CONFIG="$STAGE2_CONFIG" MODEL="$RUN_DIR/stage2-base" OUTPUT_DIR="$RUN_DIR/stage2" EXTRA_ARGS="$STAGE2_ARGS" TIMEOUT_MINUTES="$TIMEOUT_MINUTES" REPO="$REPO" VENV="$VENV" \
  submit --job-name=medcare-stage2 "${train[@]}" --time="$STAGE2_TIME" $(after "$prep") $here/stage2.sbatch </dev/null)

wait_opt=()
if [ "$WAIT" = 1 ]; then wait_opt=(--wait); fi
echo "submitted: stage1 $s1 -> prepare-stage2 $prep -> stage2 $s2 -> export (next)"
status=0
# shellcheck disable=SC2046
final=$(one_task_job "medcare-dist export --checkpoint \"$RUN_DIR/stage2/\$(cat \"$RUN_DIR/stage2/latest\")\" --out \"$RUN_DIR/final\"" |
  submit --job-name=medcare-export "${single[@]}" $(after "$s2") "${wait_opt[@]}") || status=$?
echo "submitted: export ${final:-?}; final model (when done): $RUN_DIR/final   logs: $RUN_DIR/logs/"
if [ "$WAIT" = 1 ]; then
  if [ "$status" = 0 ]; then echo "pipeline finished: $RUN_DIR/final"; else echo "pipeline failed (status $status): see $RUN_DIR/logs/ and sacct -j $s1,$prep,$s2,${final:-}" >&2; fi
fi
exit "$status"
