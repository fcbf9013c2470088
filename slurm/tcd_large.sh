#!/bin/bash
#SBATCH --job-name=tcd_large
#SBATCH --nodes=4
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
# TCD pre-training of the large MoE-BERT student (24 layers, hidden 1024, 64 experts top-1, ep_size 8) distilled from a vanilla large teacher: TCD_TEACHER=<teacher run dir> sbatch slurm/tcd_large.sh
# Switches (TCD_CPU=1, TCD_RUN_DIR, TCD_OVERRIDES, ...): tcd_train in slurm/launch.sh; README: Clusters.
export TCD_SIGNAL_LEAD_S="${TCD_SIGNAL_LEAD_S:-600}"  # the --signal lead above: the trainer warns when a save takes longer
source "${TCD_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
tcd_train large tcd "teacher.path=${TCD_TEACHER:?set TCD_TEACHER to the vanilla teacher run dir (slurm/teacher_large.sh)}"
