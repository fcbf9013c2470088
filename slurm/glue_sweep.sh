#!/bin/bash
#SBATCH --job-name=glue-sweep
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# GLUE fine-tuning sweep as a job array: one array task per GLUE task (lr grid x seeds inside it;
# a requeued or resubmitted task resumes its sweep from <out>/<TASK>/runs.jsonl).
# Before the time limit (USR1, 300 s ahead) or on preemption (SIGTERM) the running fine-tuning run
# saves its state to <out>/<TASK>/interrupted.pt and exits 85; the task is requeued and resumes it
# (tcd_srun_requeueable in slurm/launch.sh: at most TCD_MAX_REQUEUES requeues, default 3).
#   TCD_MODEL=<export dir> TCD_GLUE_DIR=<glue_data> sbatch slurm/glue_sweep.sh
# Optional: TCD_OUT (default runs/glue-<array job id>), TCD_LRS, TCD_SEEDS, TCD_EPOCHS,
# TCD_FINETUNE_ARGS (extra flags), TCD_TASKS (space-separated; default all nine, in array order).
set -euo pipefail
cd "${TCD_REPO:-$SLURM_SUBMIT_DIR}"
source slurm/launch.sh
read -r -a tasks <<< "${TCD_TASKS:-CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE WNLI}"
task="${tasks[${SLURM_ARRAY_TASK_ID:-0}]:?no GLUE task for array index ${SLURM_ARRAY_TASK_ID:-0}}"
out="${TCD_OUT:-runs/glue-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID}}}/${task}"
echo "glue: array task ${SLURM_ARRAY_TASK_ID:-0} -> ${task} on $(hostname), results in ${out}" >&2
# srun 22.05-23.02 does not pass the job's --cpus-per-task on to the step by itself
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
set +e  # from here the statuses are tcd_srun_requeueable's to judge
# shellcheck disable=SC2086  # TCD_FINETUNE_ARGS is a list of flags
tcd_srun_requeueable srun --cpus-per-task="$SRUN_CPUS_PER_TASK" "${TCD_PYTHON:-python}" -u -m tcd_ds.finetune --model "${TCD_MODEL:?set TCD_MODEL to an export dir}" \
    --task "$task" --glue-dir "${TCD_GLUE_DIR:?set TCD_GLUE_DIR to a glue_data dir}" \
    --lrs "${TCD_LRS:-2e-5,3e-5,5e-5}" --seeds "${TCD_SEEDS:-1,2,3}" --epochs "${TCD_EPOCHS:-3}" \
    --out "$out" ${TCD_FINETUNE_ARGS:-}
