#!/bin/bash
# A whole progressive training in one command: the three stages, each starting only when the
# previous one has succeeded (--dependency=afterok; a requeued stage keeps its job id, so its
# successor waits for it). Extra arguments go to every sbatch call (e.g. --partition=...).
#   LEFFA_TASK=vton LEFFA_SD15=/models/sd15-inpainting slurm/chain.sh
# (LEFFA_ARCH=concat_unet: the same three stages with the single-UNet architecture, configs/concat/)
set -euo pipefail
cd "$(dirname "$0")/.."
one=$(sbatch --parsable "$@" slurm/stage1_512.sh)
two=$(sbatch --parsable --dependency="afterok:${one%%;*}" "$@" slurm/stage2_1024.sh)
three=$(sbatch --parsable --dependency="afterok:${two%%;*}" "$@" slurm/stage3_leffa.sh)
echo "stage 1: job ${one%%;*}"
echo "stage 2: job ${two%%;*} (after ${one%%;*})"
echo "stage 3: job ${three%%;*} (after ${two%%;*})"
