#!/usr/bin/env bash
# Start the online-KD recipe on ONE node of a multi-node run (run it on every node).
#
#   NODE_RANK=0 MASTER_ADDR=192.168.100.10 MASTER_PORT=29500 \
#       bash launch/run_node.sh --config configs/qwen2_5/72B_to_7B_kd_lora.yaml [key=value ...]
#   NODE_RANK=1 MASTER_ADDR=192.168.100.10 MASTER_PORT=29500 \
#       bash launch/run_node.sh configs/qwen2_5/72B_to_7B_kd_lora.yaml [key=value ...]   # --config is optional
#   bash launch/run_node.sh --help
#
# Steps: (1) set + print the NCCL/RoCE and allocator environment (launch/nccl_env.sh; every variable can be
# overridden) and check it (python -m kd.ops.netcheck: both halves of the ConnectX-7 port in NCCL_IB_HCA, MTU 9000,
# GID index, interfaces up, GPUDirect facts), (2) check the rendezvous address and port (launch/rdzv_check.py, see
# KD_RDZV_TIMEOUT), (3) preflight under the same rendezvous (python -m kd.ops.preflight: versions, code + config
# hashes of all nodes, checkpoints, memory, disk, GPU kernels, all-reduce bandwidth vs the bytes the config moves
# across nodes per step) and refuse to start on any failure, (4)
#   tune run --nnodes $NNODES --nproc_per_node $NPROC_PER_NODE --rdzv-backend static --node-rank $NODE_RANK \
#       --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT recipes/kd_lora.py --config ... [key=value ...]
# Only global rank 0 (= NODE_RANK 0, local rank 0) writes checkpoints and metrics, to node 0's output_dir; on
# resume it reads them and broadcasts them to the other ranks, so the nodes need no shared file system.
# Everything is also written to $KD_LOG_DIR/node<NODE_RANK>-<hostname>-<time>.log (default logs/launch/).
#
# Options (environment):
#   NNODES=2  NPROC_PER_NODE=1  MASTER_PORT=29500  KD_RUN_ID=kd-<port> (same on every node)
#   KD_LOG_DIR=logs/launch   KD_VENV=.venv (activated when present)
#   KD_PREFLIGHT=1|0 (0 skips the checks: nodes with different code/config are then NOT detected)
#   KD_PREFLIGHT_ONLY=1 (stop after the checks)   KD_PREFLIGHT_ARGS="--nominal-gbps 25 --bw-mb 256"
#   KD_RDZV_TIMEOUT=900 (seconds to wait for the other node). Before torchrun, node 0 checks that MASTER_ADDR is
#     one of its addresses (warning) and MASTER_PORT is free (error); every other node TCP-connects to
#     MASTER_ADDR:MASTER_PORT, retrying until KD_RDZV_TIMEOUT, and stops with one line naming the address and port
#     ("cannot reach the rendezvous at A:P within T s") instead of torchrun's 600 s wait and traceback
#     (launch/rdzv_check.py); torchrun's own static rendezvous gets the same timeout (--rdzv-conf timeout=).
#   KD_DEBUG=1 keeps torchrun's failure report (a traceback) after a 'kd: error' / 'kd preflight: FAIL' line
#   KD_RDZV_BACKEND=static|c10d (default static: global rank = NODE_RANK * NPROC_PER_NODE + local rank, so
#     node 0 is rank 0 and writes the checkpoints; with c10d the first node to join would get rank 0)
set -uo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
cd "$REPO"

die() { echo "[kd launch] error: $*" >&2; exit 2; }

: "${NODE_RANK:?set NODE_RANK (0 on the master node, 1 on the other)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0 reachable from every node)}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
KD_RUN_ID=${KD_RUN_ID:-kd-$MASTER_PORT}
KD_LOG_DIR=${KD_LOG_DIR:-$REPO/logs/launch}
KD_PREFLIGHT=${KD_PREFLIGHT:-1}
KD_RDZV_TIMEOUT=${KD_RDZV_TIMEOUT:-900}
export NODE_RANK MASTER_ADDR MASTER_PORT

CONFIG=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || die "--config needs a path"; CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#--config=}; shift ;;
    *=*|~*) ARGS+=("$1"); shift ;;
    *.yaml|*.yml) [ -z "$CONFIG" ] || die "two config files given: '$CONFIG' and '$1'"; CONFIG=$1; shift ;;
    *) die "unexpected argument '$1' (use [--config] PATH.yaml and key=value overrides; --help)" ;;
  esac
done
[ -n "$CONFIG" ] || die "a config is required: bash launch/run_node.sh [--config] PATH.yaml [key=value ...]"
[ -f "$CONFIG" ] || die "config file '$CONFIG' not found (paths are relative to $REPO)"
case "$NODE_RANK" in ''|*[!0-9]*) die "NODE_RANK must be an integer, got '$NODE_RANK'" ;; esac
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK but NNODES=$NNODES"
case "$KD_RDZV_TIMEOUT" in ''|*[!0-9]*) die "KD_RDZV_TIMEOUT must be a whole number of seconds, got '$KD_RDZV_TIMEOUT'" ;; esac
case "$MASTER_PORT" in ''|*[!0-9]*) die "MASTER_PORT must be a port number, got '$MASTER_PORT'" ;; esac

mkdir -p "$KD_LOG_DIR"
HOST=$(hostname)
LOG="$KD_LOG_DIR/node${NODE_RANK}-${HOST}-$(date +%Y%m%d-%H%M%S).log"

# After a clean one-line error ('kd: error', 'kd preflight: FAIL'), torchrun adds its own failure report (a
# Python traceback and a ChildFailedError box): leave that out unless KD_DEBUG=1.
# (launch/quiet_torchrun.py passes bytes through as they come, so progress bars keep redrawing)
quiet_torchrun_report() {
  if [ -n "${KD_DEBUG:-}" ]; then cat; return; fi
  python "$HERE/quiet_torchrun.py"
}

main() {
  echo "[kd launch] node $NODE_RANK/$NNODES on $HOST, rendezvous $MASTER_ADDR:$MASTER_PORT (id $KD_RUN_ID), log $LOG"
  echo "[kd launch] config $CONFIG ${ARGS[*]:-}"
  if [ -n "${KD_VENV:-}" ] || [ -f "$REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1090,SC1091
    . "${KD_VENV:-$REPO/.venv}/bin/activate"
  fi
  command -v tune >/dev/null || die "'tune' not found: install kd (launch/wheelhouse.sh install) or set KD_VENV"

  # GB10 / unified memory: the allocator grows segments instead of fragmenting; CPU offload is useless
  # (CPU and GPU share the same LPDDR5x), so fsdp_cpu_offload stays False.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  echo "[kd launch] PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF OMP_NUM_THREADS=$OMP_NUM_THREADS"
  # shellcheck disable=SC1091
  . "$HERE/nccl_env.sh"

  # the rendezvous: node 0 listens on MASTER_PORT, the others must reach it within KD_RDZV_TIMEOUT
  if [ "$NODE_RANK" = 0 ]; then
    python "$HERE/rdzv_check.py" host "$MASTER_ADDR" "$MASTER_PORT" || return 2
  else
    python "$HERE/rdzv_check.py" client "$NODE_RANK" "$MASTER_ADDR" "$MASTER_PORT" "$KD_RDZV_TIMEOUT" || return 2
  fi

  local is_host=false
  [ "$NODE_RANK" = 0 ] && is_host=true
  local rdzv=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
  if [ "${KD_RDZV_BACKEND:-static}" = static ]; then
    # global ranks follow NODE_RANK (rank 0 = NODE_RANK 0 writes checkpoints/metrics)
    rdzv+=(--rdzv-backend static --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --node-rank "$NODE_RANK"
           --rdzv-conf "timeout=$KD_RDZV_TIMEOUT")
  else
    # c10d: node 0 hosts the store; global ranks follow the order in which nodes join (see the preflight report)
    rdzv+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
           --rdzv-conf "is_host=$is_host,join_timeout=$KD_RDZV_TIMEOUT")
  fi

  if [ "$KD_PREFLIGHT" = 1 ]; then
    local sdir
    sdir=$(mktemp -d "${TMPDIR:-/tmp}/kd-preflight.XXXXXX")
    echo "[kd launch] preflight: torchrun ${rdzv[*]} --rdzv-id $KD_RUN_ID-preflight -m kd.ops.preflight --config $CONFIG ${ARGS[*]:-}"
    # shellcheck disable=SC2086
    KD_PREFLIGHT_STATUS_DIR=$sdir torchrun "${rdzv[@]}" --rdzv-id "$KD_RUN_ID-preflight" \
      -m kd.ops.preflight --config "$CONFIG" ${KD_PREFLIGHT_ARGS:-} "${ARGS[@]}" 2>&1 | quiet_torchrun_report
    local rc=${PIPESTATUS[0]} ok=1 n=0 f
    for f in "$sdir"/*.status; do
      [ -e "$f" ] || continue
      n=$((n + 1))
      grep -qx OK "$f" || ok=0
    done
    rm -rf "$sdir"
    if [ $n -eq 0 ] && [ $rc -ne 0 ] && ! grep -qs "kd preflight: FAIL" "$LOG"; then
      echo "[kd launch] node $NODE_RANK ($HOST): the preflight did not start: the $NNODES nodes did not all join the rendezvous at $MASTER_ADDR:$MASTER_PORT within $KD_RDZV_TIMEOUT s (are they all started, with the same MASTER_ADDR and MASTER_PORT?); not starting training" >&2
      return 1
    fi
    if [ $rc -ne 0 ] || [ $n -lt "$NPROC_PER_NODE" ] || [ $ok -ne 1 ]; then
      echo "[kd launch] node $NODE_RANK ($HOST): preflight FAILED (see the 'kd preflight: FAIL' lines above); not starting training" >&2
      return 1
    fi
    echo "[kd launch] node $NODE_RANK ($HOST): preflight OK"
  else
    echo "[kd launch] WARNING: KD_PREFLIGHT=0: code/config equality across nodes, checkpoints and memory are NOT checked" >&2
  fi
  [ "${KD_PREFLIGHT_ONLY:-0}" = 1 ] && { echo "[kd launch] KD_PREFLIGHT_ONLY=1: done"; return 0; }

  echo "[kd launch] training: tune run ${rdzv[*]} --rdzv-id $KD_RUN_ID recipes/kd_lora.py --config $CONFIG ${ARGS[*]:-}"
  tune run "${rdzv[@]}" --rdzv-id "$KD_RUN_ID" recipes/kd_lora.py --config "$CONFIG" "${ARGS[@]}" 2>&1 \
    | quiet_torchrun_report
  local trc=${PIPESTATUS[0]}
  if [ $trc -ne 0 ]; then
    echo "[kd launch] node $NODE_RANK ($HOST): training exited with code $trc (log: $LOG)" >&2
  else
    echo "[kd launch] node $NODE_RANK ($HOST): training finished"
  fi
  return $trc
}

# one line: bash reads a script as it runs it, so an edit of this file during a run must not shift what comes next
main 2>&1 | tee -a "$LOG"; exit "${PIPESTATUS[0]}"
