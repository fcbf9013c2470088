#!/bin/bash
#SBATCH --job-name=teacher_large
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
# Pre-training of the vanilla (dense) large teacher: sbatch slurm/teacher_large.sh
# Switches (TCD_CPU=1, TCD_RUN_DIR, TCD_OVERRIDES, ...): tcd_train in slurm/launch.sh; README: Clusters.
export TCD_SIGNAL_LEAD_S="${TCD_SIGNAL_LEAD_S:-600}"  # the --signal lead above: the trainer warns when a save takes longer
source "${TCD_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
tcd_train large vanilla
