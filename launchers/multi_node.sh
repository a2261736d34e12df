#!/usr/bin/env bash
# Pretrain on several machines with the DeepSpeed launcher and a hostfile.
#
# Usage:
#   launchers/multi_node.sh HOSTFILE [--config RECIPE_OR_FILE] [section.field=value ...]
#
# Example (2 nodes x 8 GPUs, global batch 2048 -> 128 images per GPU):
#   launchers/multi_node.sh launchers/hostfile.example --config imagenet_sfrik_r50 \
#       data.path=/data/imagenet/train train.run_dir=/shared/runs/sfrik_r50
#
# Run it on one node (normally the first host); DeepSpeed starts the processes on every
# host of HOSTFILE over pdsh/ssh (see launchers/hostfile.example for its format).
# train.run_dir must be on a file system every node shares: all ranks write their part of
# each ZeRO checkpoint there. Environment variables listed in a .deepspeed_env file (in the
# current directory or $HOME, one NAME=value per line, e.g. NCCL_SOCKET_IFNAME=ib0) are
# exported on every node.
# Environment:
#   MASTER_ADDR  rendezvous host (default: the first host of HOSTFILE)
#   MASTER_PORT  rendezvous port (default 29500)
#   NUM_NODES    use only the first NUM_NODES hosts (default: all)
#   LAUNCHER     deepspeed --launcher: pdsh (default), openmpi, mvapich, slurm, ...
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
fi
HOSTFILE=$1
shift

if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
fi
if [[ -z "$MASTER_ADDR" ]]; then
    echo "multi_node.sh: no host found in $HOSTFILE" >&2
    exit 2
fi

extra_args=()
if [[ -n "${NUM_NODES:-}" ]]; then
    extra_args+=(--num_nodes "$NUM_NODES")
fi
if [[ -n "${LAUNCHER:-}" ]]; then
    extra_args+=(--launcher "$LAUNCHER")
fi

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" ${extra_args[@]+"${extra_args[@]}"} \
    --module sfrik_scale.pretrain "$@"
