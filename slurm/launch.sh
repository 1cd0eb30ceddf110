#!/bin/bash
# Run one stage of a progressive training on the nodes of this SLURM job (called by stage*.sh).
# usage: launch.sh <1|2|3>
#
# Environment:
#   LEFFA_TASK          vton (default), dresscode or pose: picks configs/<task>_<stage>.yaml
#   LEFFA_ARCH          dual_unet (default: the paper's) or concat_unet (a CatVTON-style single UNet:
#                       configs/concat/<task>_<stage>.yaml; vton and dresscode)
#   LEFFA_HOME          the leffa checkout (default: the folder sbatch was run from)
#   LEFFA_EXTRA_CONFIG  an optional config applied after the stage's (e.g. a cluster's paths)
#   LEFFA_SD15, LEFFA_SHARDS, LEFFA_RUNS: read by the configs (see configs/base/train.yaml)
set -euo pipefail
stage="$1"
task="${LEFFA_TASK:-vton}"
arch="${LEFFA_ARCH:-dual_unet}"
cd "${LEFFA_HOME:-${SLURM_SUBMIT_DIR:-.}}"

case "$task:$stage" in
  vton:1|dresscode:1) config="configs/${task}_512.yaml" ;;
  vton:2|dresscode:2) config="configs/${task}_1024.yaml" ;;
  vton:3|dresscode:3) config="configs/${task}_1024_leffa.yaml" ;;
  pose:1) config="configs/pose_256.yaml" ;;
  pose:2) config="configs/pose_512.yaml" ;;
  pose:3) config="configs/pose_512_leffa.yaml" ;;
  *) echo "error: LEFFA_TASK=$task stage $stage: valid tasks are vton, dresscode, pose; stages 1, 2, 3" >&2; exit 2 ;;
esac
case "$arch:$task" in
  dual_unet:*) ;;
  concat_unet:vton|concat_unet:dresscode) config="configs/concat/${config#configs/}" ;;
  concat_unet:*) echo "error: LEFFA_ARCH=concat_unet takes try-on only: set LEFFA_TASK to vton or dresscode, got $task" >&2; exit 2 ;;
  *) echo "error: LEFFA_ARCH=$arch: valid architectures are dual_unet, concat_unet" >&2; exit 2 ;;
esac

leffa="${LEFFA_BIN:-$PWD/.venv/bin/leffa}"
# One task per device: the Trainer's num_nodes and devices are the allocation's, so they always match.
# On SIGUSR1 (--signal in the stage scripts) leffa.requeue.SlurmRequeue (configs/base/train.yaml)
# saves hpc_ckpt_<n>.ckpt in the stage's default_root_dir at the next step and requeues the job;
# the requeued job resumes from it (Lightning picks it) at the same global step.
exec srun --kill-on-bad-exit=1 "$leffa" fit --config "$config" \
  ${LEFFA_EXTRA_CONFIG:+--config "$LEFFA_EXTRA_CONFIG"} \
  --trainer.num_nodes="${SLURM_JOB_NUM_NODES}" \
  --trainer.devices="${SLURM_NTASKS_PER_NODE}"
