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
# host of HOSTFILE over pdsh/ssh (see launchers/hostfile.example for its format). Before
# starting anything it checks, each failure one line and exit status 2:
#   * HOSTFILE: every line "<host> slots=<N>" with N >= 1, no host twice;
#   * the configuration for the world size the hostfile gives (sum of the slots): the batch
#     arithmetic included, e.g. more ranks than train.global_batch_size images;
#   * every host answers over ssh (BatchMode, within SSH_TIMEOUT seconds): an unreachable
#     host would otherwise leave the other ranks waiting for it.
# The working directory and train.run_dir must be on a file system every node shares (the
# remote processes `cd` to this directory; all ranks write their part of each checkpoint to
# the run directory). The same Python environment must exist at the same path on every
# node: the remote command runs this launcher's python by its full path.
#
# Environment that reaches the remote ranks: DeepSpeed forwards every variable whose name
# starts with PYTHON (PYTHONPATH, with this directory prepended) and the accelerator's
# (NCCL_*, ...); this script adds SFRIK_HOSTFILE_HOSTS (the hosts in order, so that a rank
# names its node as the hostfile does), PATH, VIRTUAL_ENV, DS_ACCELERATOR, OMP_NUM_THREADS and
# TORCH_EXTENSIONS_DIR when set, the names listed in FORWARD_ENV, and then the lines of
# .deepspeed_env in this directory and in $HOME (NAME=value, e.g. NCCL_SOCKET_IFNAME=ib0;
# blank and # lines are skipped; these win). Values must not contain double quotes.
# Anything else (the login shell's profile) is NOT read: the remote command runs in a
# non-interactive ssh shell.
#
# Environment:
#   MASTER_ADDR  rendezvous host (default: the first host of HOSTFILE). Always passed to
#                DeepSpeed: without it DeepSpeed runs `ssh HOST hostname -I` and takes the
#                first address printed, which may not be the one the hosts share.
#   MASTER_PORT  rendezvous port (default 29500)
#   NUM_NODES    use only the first NUM_NODES hosts (default: all)
#   LAUNCHER     deepspeed --launcher: pdsh (default), openmpi, mvapich, ... (the checks
#                above are made for every launcher; ssh reachability only for pdsh)
#   SSH_PORT     ssh port of the hosts (default: ssh's)
#   SSH_TIMEOUT  seconds for each host's ssh check (default 10)
#   FORWARD_ENV  more variable names to export on every node, space-separated
#   PYTHON       interpreter for the configuration check (default: python)
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    if [[ $# -ge 1 ]]; then echo "multi_node.sh: no hostfile $1" >&2; exit 2; fi
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
fi
HOSTFILE=$1
shift
PYTHON=${PYTHON:-python}
SSH_TIMEOUT=${SSH_TIMEOUT:-10}

# -- the hostfile: "<host> slots=<N>", N >= 1, each host once (DeepSpeed accepts slots=0 and trailing text)
hosts=()
slots=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    [[ -z "${line//[[:space:]]/}" ]] && continue
    if [[ ! $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
        echo "multi_node.sh: $HOSTFILE line $lineno: expected '<host> slots=<N>', got '${line}'" >&2
        exit 2
    fi
    host=${BASH_REMATCH[1]}
    n=$((10#${BASH_REMATCH[2]}))
    if [[ $n -lt 1 ]]; then
        echo "multi_node.sh: $HOSTFILE line $lineno: slots must be >= 1, got slots=${BASH_REMATCH[2]} for $host" >&2
        exit 2
    fi
    for h in ${hosts[@]+"${hosts[@]}"}; do
        if [[ $h == "$host" ]]; then
            echo "multi_node.sh: $HOSTFILE line $lineno: host $host is listed twice" >&2
            exit 2
        fi
    done
    hosts+=("$host")
    slots+=("$n")
done < "$HOSTFILE"
if [[ ${#hosts[@]} -eq 0 ]]; then
    echo "multi_node.sh: no host found in $HOSTFILE" >&2
    exit 2
fi
used=${#hosts[@]}
if [[ -n "${NUM_NODES:-}" ]]; then
    if [[ ! $NUM_NODES =~ ^[1-9][0-9]*$ || $NUM_NODES -gt ${#hosts[@]} ]]; then
        echo "multi_node.sh: NUM_NODES=$NUM_NODES, but $HOSTFILE lists ${#hosts[@]} hosts" >&2
        exit 2
    fi
    used=$NUM_NODES
fi
world=0
for ((i = 0; i < used; i++)); do world=$((world + slots[i])); done

# -- the configuration for that many ranks (one line and status 2 when it does not fit)
"$PYTHON" -m sfrik_scale.pretrain --check-world-size "$world" "$@"

# -- every host answers over ssh, in parallel, each within SSH_TIMEOUT seconds
ssh_opts=(-o BatchMode=yes -o ConnectTimeout="$SSH_TIMEOUT")
ds_ssh=()
if [[ -n "${SSH_PORT:-}" ]]; then ssh_opts+=(-p "$SSH_PORT"); ds_ssh=(--ssh_port "$SSH_PORT"); fi
if [[ "${LAUNCHER:-pdsh}" == pdsh ]]; then
    checks=$(mktemp -d)
    for ((i = 0; i < used; i++)); do
        h=${hosts[i]}
        ( timeout -k 2 $((SSH_TIMEOUT + 5)) ssh "${ssh_opts[@]}" "$h" true </dev/null >/dev/null 2>"$checks/$i" \
            || echo "exit $?" >> "$checks/$i.failed" ) &
    done
    wait
    bad=()
    why=""
    for ((i = 0; i < used; i++)); do
        if [[ -f "$checks/$i.failed" ]]; then
            bad+=("${hosts[i]}")
            if [[ -z "$why" ]]; then
                why=$(grep -v '^\s*$' "$checks/$i" | tail -n 1 || true)
                [[ -z "$why" ]] && why="no answer within $((SSH_TIMEOUT + 5)) s"
            fi
        fi
    done
    rm -rf "$checks"
    if [[ ${#bad[@]} -gt 0 ]]; then
        list=$(IFS=,; echo "${bad[*]}")
        echo "multi_node.sh: cannot reach $list over ssh (BatchMode, ${SSH_TIMEOUT} s): $why" >&2
        exit 2
    fi
fi

if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=${hosts[0]}
fi

# -- the environment file DeepSpeed's runner reads (DS_ENV_FILE), merged from the sources above
envfile=$(mktemp "${TMPDIR:-/tmp}/sfrik-deepspeed-env.XXXXXX")
trap 'rm -f "$envfile"' EXIT
# the hosts in hostfile order: rank records and failure messages name a node as the hostfile does
SFRIK_HOSTFILE_HOSTS="${hosts[*]:0:$used}"
for name in SFRIK_HOSTFILE_HOSTS PATH VIRTUAL_ENV DS_ACCELERATOR OMP_NUM_THREADS TORCH_EXTENSIONS_DIR ${FORWARD_ENV:-}; do
    if [[ -n "${!name+x}" ]]; then printf '%s=%s\n' "$name" "${!name}" >> "$envfile"; fi
done
for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
    if [[ -f "$f" ]]; then grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$f" >> "$envfile" || true; fi
done
export DS_ENV_FILE=$envfile  # an absolute path: DeepSpeed reads this file instead of its two default places

extra_args=(--num_nodes "$used")
if [[ -n "${LAUNCHER:-}" ]]; then
    extra_args+=(--launcher "$LAUNCHER")
fi

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --no_ssh_check ${ds_ssh[@]+"${ds_ssh[@]}"} "${extra_args[@]}" --module sfrik_scale.pretrain "$@" &
ds_pid=$!
# forward a termination to DeepSpeed's runner, which stops the remote ranks (pdsh kill command)
trap 'kill -TERM "$ds_pid" 2>/dev/null || true' TERM INT
status=0
while true; do
    wait "$ds_pid" && status=0 || status=$?
    if ! kill -0 "$ds_pid" 2>/dev/null; then break; fi  # wait was interrupted by a trapped signal
done
exit "$status"
