# Sourced by stage1.sbatch and stage2.sbatch: `run_preemptible CMD ...` runs the job step.
#
# The step runs in the background so that this batch shell can take the time-limit warning
# (#SBATCH --signal=B:USR1@N: sent to this shell only) and pass it to srun, which forwards it to
# every task: the ranks save the step reached and exit with status 75. A warned step that did not
# finish is requeued here (same job id; --open-mode=append keeps one log), and the next attempt
# continues with --resume auto. Preemption and scancel send SIGTERM to the ranks themselves
# (they save and exit 75 the same way); a preempted job is requeued by SLURM (--requeue).
run_preemptible() {
  local warned=0 status pid
  "$@" &
  pid=$!
  trap 'warned=1; echo "$(date +%T) USR1 (time limit near): the ranks save and stop"; kill -USR1 "$pid" 2>/dev/null || true' USR1
  while true; do
    status=0
    wait "$pid" || status=$?
    if [ "$status" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # the trap interrupted the wait
    break
  done
  trap - USR1
  if [ "$warned" = 1 ] && [ "$status" != 0 ]; then
    echo "$(date +%T) stopped before the time limit (status $status): requeueing job $SLURM_JOB_ID; the next attempt resumes"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
