#!/bin/bash
# Progressive training, stage 2: high resolution (vton/dresscode 1024x768, pose 512x352), from stage 1's weights.
# sbatch slurm/stage2_1024.sh (from the leffa checkout), or slurm/chain.sh for all three stages.
#SBATCH --job-name=leffa-stage2
#SBATCH --nodes=4                # -> trainer.num_nodes (launch.sh passes SLURM_JOB_NUM_NODES)
#SBATCH --ntasks-per-node=8      # one task per GPU -> trainer.devices (launch.sh passes it)
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8        # data.num_workers (4) + the training process + headroom
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180        # 180 s before the time limit: checkpoint and requeue (leffa.requeue.SlurmRequeue)
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=leffa-stage2-%j.out
exec "${LEFFA_HOME:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" 2
