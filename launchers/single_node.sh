#!/usr/bin/env bash
# Pretrain on one machine with the DeepSpeed launcher, one process per GPU.
#
# Usage:
#   launchers/single_node.sh NUM_PROCS [--config RECIPE_OR_FILE] [section.field=value ...]
#
# Examples:
#   launchers/single_node.sh 8 --config imagenet_sfrik_r50 data.path=/data/imagenet/train
#   launchers/single_node.sh 2                    # the demo, 2 processes (CPU-only works too)
#   MASTER_PORT=29600 launchers/single_node.sh 4 --config imagenet20_sfrik_r18_q8192 \
#       data.path=/data/imagenet/train train.run_dir=runs/in20_q8192
#
# NUM_PROCS is passed as --num_gpus: on a CPU-only machine DeepSpeed's CPU accelerator
# starts that many CPU processes (gloo). Everything after NUM_PROCS goes to
# `python -m sfrik_scale.pretrain` unchanged (the launcher adds --local_rank itself).
# The global batch (train.global_batch_size) stays the same whatever NUM_PROCS is; it must be
# divisible by NUM_PROCS (x train.micro_batch_size when set), which is checked before training.
# Environment: MASTER_PORT (default 29500), OMP_NUM_THREADS (default: cores / NUM_PROCS).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
fi
NUM_PROCS=$1
shift

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / NUM_PROCS > 0 ? cores / NUM_PROCS : 1 ))
    export OMP_NUM_THREADS
fi

exec deepspeed --num_gpus "$NUM_PROCS" --master_port "${MASTER_PORT:-29500}" \
    --module sfrik_scale.pretrain "$@"
