#!/bin/bash
#SBATCH --job-name=tcd_xl
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
# TCD pre-training of the xl MoE-BERT student (hidden 2048, 24 layers, 64 experts, ep_size 8): TCD_TEACHER=<teacher run dir> sbatch slurm/tcd_xl.sh
# Switches (TCD_CPU=1, TCD_RUN_DIR, TCD_OVERRIDES, ...): tcd_train in slurm/launch.sh; README: Clusters.
export TCD_SIGNAL_LEAD_S="${TCD_SIGNAL_LEAD_S:-900}"  # the --signal lead above: the trainer warns when a save takes longer
source "${TCD_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
tcd_train xl tcd "teacher.path=${TCD_TEACHER:?set TCD_TEACHER to the vanilla teacher run dir}"
