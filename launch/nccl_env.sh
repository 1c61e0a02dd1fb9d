# shellcheck shell=bash
# Source this file to set (and print) the NCCL / gloo environment for a RoCE (ConnectX-7) link between
# two DGX Spark nodes. Every variable that is already set is kept, so any of them can be overridden:
#   NCCL_SOCKET_IFNAME=enp1s0f0np0 NCCL_IB_HCA=rocep1s0f0 NCCL_IB_GID_INDEX=3 bash launch/run_node.sh ...
#
# Detection (Linux sysfs, no extra tools): RDMA devices under /sys/class/infiniband whose port 1 is ACTIVE
# with link layer Ethernet (= RoCE); NCCL_IB_HCA lists them; NCCL_SOCKET_IFNAME is the netdev of the first
# one (bootstrap + fallback traffic on the same 200G link); NCCL_IB_GID_INDEX is the GID whose type is
# "RoCE v2" and that carries an IPv4-mapped address (routable RoCE v2; usually 3). Without any RDMA device
# nothing NCCL-specific is set (CPU/gloo test runs). sysfs is read through $KD_SYSFS_ROOT (default /sys; tests
# point it at a fake tree).
#
# Then `python -m kd.ops.netcheck` reports what NCCL will use and warns, each with its fix, when (DGX Spark) only
# one of the two PCIe halves of a ConnectX-7 port is in NCCL_IB_HCA, the other half is down, the RoCE MTU is below
# 9000, NCCL_IB_GID_INDEX is not the RoCE v2 IPv4 GID, NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME are missing or down;
# and what can be read about GPUDirect RDMA (nvidia_peermem, DMA-BUF; "unknown" when it cannot be read).

kd_nccl_env() {
  local ib=${KD_SYSFS_ROOT:-/sys}/class/infiniband hcas=() hca netdev="" gid_idx=""
  if [ -d "$ib" ]; then
    for hca in "$ib"/*; do
      [ -e "$hca" ] || continue
      local port="$hca/ports/1"
      [ -r "$port/state" ] || continue
      grep -q ACTIVE "$port/state" 2>/dev/null || continue
      [ "$(cat "$port/link_layer" 2>/dev/null)" = "Ethernet" ] || continue
      hcas+=("$(basename "$(readlink -f "$hca/device" 2>/dev/null || echo zzzz)") $(basename "$hca")")
    done
    # PCI address order (0000:01:00.0 before 0002:01:00.0), the same on every node whatever the locale
    mapfile -t hcas < <(printf '%s\n' "${hcas[@]}" | LC_ALL=C sort | awk 'NF {print $2}')
  fi
  if [ ${#hcas[@]} -gt 0 ]; then
    hca=${hcas[0]}
    netdev=$(ls "$ib/$hca/device/net" 2>/dev/null | head -n1 || true)
    local t i
    for t in "$ib/$hca"/ports/1/gid_attrs/types/*; do
      [ -r "$t" ] || continue
      i=$(basename "$t")
      if [ "$(cat "$t" 2>/dev/null)" = "RoCE v2" ] &&
         grep -q '^0000:0000:0000:0000:0000:ffff' "$ib/$hca/ports/1/gids/$i" 2>/dev/null; then
        gid_idx=$i; break
      fi
    done
    export NCCL_IB_HCA=${NCCL_IB_HCA:-$(IFS=,; echo "${hcas[*]}")}
    export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-${gid_idx:-3}}
    [ -n "$netdev" ] && export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$netdev}
    export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
    export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-}  # leave NCCL's choice unless overridden
    [ -z "$NCCL_NET_GDR_LEVEL" ] && unset NCCL_NET_GDR_LEVEL
  else
    echo "[kd launch] no active RoCE/IB device found under $ib: NCCL would use TCP sockets (fine for CPU/gloo tests, slow for GPUs)"
  fi
  # gloo (CPU process groups, also used by torch for object collectives) follows the same interface
  if [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    if [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then
      export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
    else
      case "${MASTER_ADDR:-}" in localhost|127.*) export GLOO_SOCKET_IFNAME=lo ;; esac
    fi
  fi
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  echo "[kd launch] network environment:"
  env | grep -E '^(NCCL_|GLOO_SOCKET_IFNAME|TORCH_NCCL_|UCX_NET_DEVICES)' | sort | sed 's/^/[kd launch]   /'
  # the report: devices found vs used, both halves of the port, MTU, GID index, interfaces up, GPUDirect
  if command -v python >/dev/null 2>&1; then
    echo "[kd launch] NCCL environment check (kd.ops.netcheck):"
    local expect=()
    [ ${#hcas[@]} -gt 0 ] && expect=(--expect-rdma)
    python -m kd.ops.netcheck "${expect[@]}" || true
  fi
}
kd_nccl_env
