"""What the NCCL / RoCE environment of this node looks like, and what is wrong with it (standard library only).

Used by ``launch/nccl_env.sh`` (``python -m kd.ops.netcheck``, printed before the preflight) and by
``kd preflight`` (each node's report, in every node's log). Everything is read from sysfs / procfs without root,
through ``$KD_SYSFS_ROOT`` (default ``/sys``) and ``$KD_PROCFS_ROOT`` (default ``/proc``), so tests can point them
at a fake tree.

Checked (DGX Spark: the ConnectX-7's 200 Gb/s port appears as TWO RDMA devices, e.g. ``rocep1s0f0`` at PCI
``0000:01:00.0`` and ``roceP2p1s0f0`` at ``0002:01:00.0``, each a PCIe x4 half of the port; NCCL reaches ~3 GB/s
with one and ~24 GB/s with both named in ``NCCL_IB_HCA``, MTU 9000; NVIDIA dgx-spark-playbooks issue 102 / PR 103):

- the RDMA devices found (port state, link layer, netdev, PCI address, rate) vs those ``NCCL_IB_HCA`` selects
  (NCCL's syntax: comma list, ``^`` excludes, ``=`` exact names, otherwise prefixes, ``:port`` suffixes);
  a WARNING when a device of the same port (same PCI bus:device.function in another PCI domain) is left out,
  with the ``export NCCL_IB_HCA=...`` line that names both halves; a WARNING when it names devices of several
  ports (NCCL pairs devices by position across nodes) or a device that is missing / not active;
- ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME``: the interfaces exist and are up;
- the MTU of the RoCE netdevs: a WARNING below 9000 with the ``ip link set dev X mtu 9000`` fix;
- the GID index: the RoCE v2 GID carrying an IPv4-mapped address, per device, vs ``NCCL_IB_GID_INDEX``;
- GPUDirect RDMA: ``NCCL_DMABUF_ENABLE`` / ``NCCL_NET_GDR_LEVEL``, whether ``nvidia_peermem`` is loaded, whether the
  NVIDIA kernel module is the open one (DMA-BUF needs it, and Linux >= 5.12); the verdict says "unknown" when
  these facts do not settle it (NCCL_DEBUG=INFO prints ``DMA-BUF is available`` and ``/GDRDMA`` on its channels).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

RECOMMENDED_MTU = 9000
_PCI_RE = re.compile(r"^([0-9a-fA-F]{4,}):([0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])$")
_ROCE_NAME_RE = re.compile(r"^roce(?:P\d+)?(p\d+s\d+f\d+)$")


def sysfs_root() -> Path:
    return Path(os.environ.get("KD_SYSFS_ROOT", "/sys"))


def procfs_root() -> Path:
    return Path(os.environ.get("KD_PROCFS_ROOT", "/proc"))


def _read(p: Path) -> Optional[str]:
    try:
        return p.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass
class Hca:
    """One RDMA device (port 1) as sysfs shows it."""

    name: str
    state: str = "?"  # ACTIVE, DOWN, ... (from "4: ACTIVE")
    link_layer: str = "?"  # Ethernet (RoCE) or InfiniBand
    netdevs: List[str] = field(default_factory=list)
    pci: str = ""  # 0002:01:00.0
    rate: str = ""
    gid_index: Optional[int] = None  # the RoCE v2 GID with an IPv4-mapped address
    ipv4: List[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"

    @property
    def roce(self) -> bool:
        return self.link_layer == "Ethernet"

    @property
    def port_key(self) -> str:
        """Devices with the same key are parts of one physical port: the PCI bus:device.function without the
        domain (DGX Spark: 0000:01:00.0 and 0002:01:00.0), else the name without its 'P<domain>' part."""
        m = _PCI_RE.match(self.pci)
        if m:
            return m.group(2).lower()
        m = _ROCE_NAME_RE.match(self.name)
        return m.group(1) if m else self.name

    @property
    def netdev(self) -> str:
        return self.netdevs[0] if self.netdevs else "?"


def scan_hcas(root: Optional[Path] = None) -> List[Hca]:
    """The RDMA devices under ``<root>/class/infiniband`` (port 1 of each), in PCI address order."""
    base = (root or sysfs_root()) / "class" / "infiniband"
    out: List[Hca] = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        h = Hca(d.name)
        port = d / "ports" / "1"
        state = _read(port / "state") or "?"
        h.state = state.split(":", 1)[-1].strip() if ":" in state else state
        h.link_layer = _read(port / "link_layer") or "?"
        h.rate = _read(port / "rate") or ""
        try:
            h.netdevs = sorted(p.name for p in (d / "device" / "net").iterdir())
        except OSError:
            pass
        try:
            pci = os.path.basename(os.path.realpath(d / "device"))
            h.pci = pci if _PCI_RE.match(pci) else ""
        except OSError:
            pass
        types = port / "gid_attrs" / "types"
        try:
            idxs = sorted((int(p.name) for p in types.iterdir() if p.name.isdigit()))
        except OSError:
            idxs = []
        for i in idxs:
            if _read(types / str(i)) != "RoCE v2":
                continue
            gid = (_read(port / "gids" / str(i)) or "").lower()
            if gid.startswith("0000:0000:0000:0000:0000:ffff:"):
                a, b = gid.split(":")[6:8]
                ip = ".".join(str(x) for x in (int(a[:2], 16), int(a[2:], 16), int(b[:2], 16), int(b[2:], 16)))
                h.ipv4.append(ip)
                if h.gid_index is None:
                    h.gid_index = i
        out.append(h)
    return sorted(out, key=lambda h: (h.pci or "~", h.name))  # PCI order: 0000:01:00.0 before 0002:01:00.0


def parse_nccl_list(value: str) -> Tuple[bool, bool, List[str]]:
    """NCCL's interface / HCA list syntax: (exclude, exact, names without ':port' suffixes)."""
    v = value.strip()
    exclude = v.startswith("^")
    if exclude:
        v = v[1:]
    exact = v.startswith("=")
    if exact:
        v = v[1:]
    names = [x.strip().split(":")[0] for x in v.split(",") if x.strip()]
    return exclude, exact, names


def nccl_selects(name: str, value: str) -> bool:
    """Whether NCCL's list ``value`` (NCCL_IB_HCA / NCCL_SOCKET_IFNAME syntax) selects ``name``."""
    exclude, exact, names = parse_nccl_list(value)
    hit = any(name == n if exact else name.startswith(n) for n in names)
    return not hit if exclude else hit


def _iface(root: Path, name: str) -> Tuple[bool, bool, Optional[int]]:
    """(exists, up, mtu) of a network interface."""
    d = root / "class" / "net" / name
    if not d.exists():
        return False, False, None
    oper = (_read(d / "operstate") or "").lower()
    flags = _read(d / "flags") or "0"
    try:
        up_flag = bool(int(flags, 16) & 0x1)
    except ValueError:
        up_flag = False
    up = oper == "up" or (oper in ("unknown", "") and up_flag)
    mtu = _read(d / "mtu")
    return True, up, int(mtu) if mtu and mtu.isdigit() else None


def _interfaces(root: Path) -> List[str]:
    try:
        return sorted(p.name for p in (root / "class" / "net").iterdir())
    except OSError:
        return []


@dataclass
class NetReport:
    info: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    hcas: List[Hca] = field(default_factory=list)

    def lines(self, prefix: str = "") -> List[str]:
        return [f"{prefix}{l}" for l in self.info] + [f"{prefix}WARNING: {w}" for w in self.warnings]


def _kernel_at_least(release: str, want: Tuple[int, int]) -> Optional[bool]:
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return None if not m else (int(m.group(1)), int(m.group(2))) >= want


def gpudirect_facts(env: Mapping[str, str], sys_root: Path, proc_root: Path,
                    cuda_dmabuf: Optional[bool] = None) -> str:
    """One line: what can be read about GPUDirect RDMA (nvidia_peermem / DMA-BUF), and a verdict that says
    'unknown' when the readable facts do not settle it. ``cuda_dmabuf``: CUDA's DMA_BUF_SUPPORTED attribute when
    the caller could query it."""
    dmabuf = env.get("NCCL_DMABUF_ENABLE")
    gdr = env.get("NCCL_NET_GDR_LEVEL")
    peermem = (sys_root / "module" / "nvidia_peermem").is_dir() or (sys_root / "module" / "nv_peer_mem").is_dir()
    drv = _read(proc_root / "driver" / "nvidia" / "version")
    kernel = _read(proc_root / "sys" / "kernel" / "osrelease") or ""
    open_mod = None if drv is None else ("Open Kernel Module" in drv)
    new_kernel = _kernel_at_least(kernel, (5, 12))
    facts = [f"NCCL_DMABUF_ENABLE={dmabuf if dmabuf is not None else 'unset (NCCL default: on where supported)'}"]
    if gdr is not None:
        facts.append(f"NCCL_NET_GDR_LEVEL={gdr}")
    facts.append(f"nvidia_peermem {'loaded' if peermem else 'not loaded'}")
    facts.append("NVIDIA kernel module: " + ("not found (no NVIDIA driver?)" if drv is None
                                             else "open" if open_mod else "proprietary"))
    facts.append(f"kernel {kernel or 'unknown'}")
    if cuda_dmabuf is not None:
        facts.append(f"CUDA DMA_BUF_SUPPORTED={int(cuda_dmabuf)}")
    if str(gdr).upper() in ("0", "LOC"):
        verdict = "off (NCCL_NET_GDR_LEVEL disables it)"
    elif peermem:
        verdict = "likely (nvidia_peermem is loaded)"
    elif dmabuf == "0":
        verdict = "no: NCCL_DMABUF_ENABLE=0 and nvidia_peermem is not loaded (NCCL stages through host memory)"
    elif cuda_dmabuf is False:
        verdict = "no: the GPU reports no DMA-BUF support and nvidia_peermem is not loaded (host-memory staging)"
    elif open_mod and new_kernel and cuda_dmabuf:
        verdict = "likely through DMA-BUF"
    elif open_mod and new_kernel:
        verdict = ("unknown (DMA-BUF possible: open kernel module, Linux >= 5.12; NCCL_DEBUG=INFO shows "
                   "'DMA-BUF is available' and '/GDRDMA' on its channels)")
    else:
        verdict = "unknown"
    return f"GPUDirect RDMA: {verdict} [{'; '.join(facts)}]"


# One pass over every check a user needs on a Spark (HCAs vs NCCL_IB_HCA, port halves, MTU, GID, interfaces,
# GPUDirect): kept together so the report's lines come out in the order the docs explain them.
def nccl_report(env: Optional[Mapping[str, str]] = None, *, expect_rdma: bool = False,
                cuda_dmabuf: Optional[bool] = None) -> NetReport:
    """The NCCL environment of this node vs what sysfs shows. ``expect_rdma``: a multi-node GPU run, where
    no usable RDMA device (NCCL would fall back to TCP sockets, ~1-3 GB/s) is a warning, not a note."""
    env = os.environ if env is None else env
    root, proc = sysfs_root(), procfs_root()
    rep = NetReport()
    hcas = scan_hcas(root)
    rep.hcas = hcas
    roce = [h for h in hcas if h.roce]
    ib_hca = env.get("NCCL_IB_HCA", "")
    if env.get("NCCL_IB_DISABLE", "0") == "1":
        (rep.warnings if expect_rdma else rep.info).append(
            "NCCL_IB_DISABLE=1: NCCL uses TCP sockets between the nodes (~1-3 GB/s); unset it to use RoCE.")
    if not hcas:
        msg = (f"no RDMA device under {root}/class/infiniband: NCCL would use TCP sockets between the nodes "
               "(~1-3 GB/s); check the ConnectX driver (mlx5_ib) and 'rdma link'.")
        (rep.warnings if expect_rdma else rep.info).append(msg)
    for h in hcas:
        used = nccl_selects(h.name, ib_hca) if ib_hca else h.active
        rep.info.append(
            f"RDMA {h.name}: {h.state} {h.link_layer}, netdev {','.join(h.netdevs) or '?'}, PCI {h.pci or '?'}"
            + (f", {h.rate}" if h.rate else "")
            + (f", RoCE v2 IPv4 GID index {h.gid_index} ({', '.join(h.ipv4)})" if h.gid_index is not None else "")
            + (" [used by NCCL]" if used else "")
        )
    if ib_hca:
        rep.info.append(f"NCCL_IB_HCA={ib_hca}")
    # ---- which devices NCCL will use, and the halves it leaves out ------------------------------------
    selected = [h for h in roce if (nccl_selects(h.name, ib_hca) if ib_hca else h.active)]
    if ib_hca:
        exclude, exact, names = parse_nccl_list(ib_hca)
        if not exclude:
            for n in names:
                match = [h for h in hcas if (h.name == n if exact else h.name.startswith(n))]
                if not match:
                    rep.warnings.append(
                        f"NCCL_IB_HCA names {n!r} but there is no such RDMA device here "
                        f"(found: {', '.join(h.name for h in hcas) or 'none'}); the names differ per system: "
                        "'rdma link' / 'ibdev2netdev' show them.")
                for h in match:
                    if not h.active:
                        rep.warnings.append(f"NCCL_IB_HCA names {h.name}, whose port is {h.state}: bring its netdev "
                                            f"{h.netdev} up (sudo ip link set dev {h.netdev} up) or leave it out.")
    used_active = [h for h in selected if h.active]
    groups = {}
    for h in used_active:
        groups.setdefault(h.port_key, []).append(h)
    for key, members in groups.items():
        siblings = [h for h in roce if h.port_key == key and h not in selected]
        for sib in siblings:
            names = [h.name for h in roce if h.port_key == key]
            if sib.active:
                _, exact, _ = parse_nccl_list(ib_hca)
                fix = "export NCCL_IB_HCA=" + ("=" if exact else "") + ",".join(
                    [h.name for h in roce if h in selected or h.port_key == key])
                rep.warnings.append(
                    f"NCCL_IB_HCA={ib_hca or '(unset)'} uses {', '.join(h.name for h in members)} but not {sib.name}, "
                    f"the other half of the same port (PCI ..{key}): NCCL then reaches about half the link "
                    f"(~3-12 GB/s instead of ~24 GB/s on DGX Spark); fix: {fix} (on every node)")
            else:
                rep.warnings.append(
                    f"{sib.name} (the other half of {members[0].name}'s port, PCI ..{key}) is {sib.state}: NCCL can "
                    f"use only half of the link; bring it up: sudo ip link set dev {sib.netdev} up, give it an "
                    f"address, then name both: export NCCL_IB_HCA={','.join(names)}")
    if len(groups) > 1:
        rep.warnings.append(
            f"NCCL_IB_HCA={ib_hca or '(all active devices)'} spans {len(groups)} ports "
            f"({'; '.join(','.join(h.name for h in m) for m in groups.values())}): NCCL pairs devices by position "
            "across the nodes, so name only the two halves of the port that links the two nodes, in the same order "
            "on both.")
    # ---- MTU of the RoCE netdevs in use --------------------------------------------------------------
    for h in used_active:
        for nd in h.netdevs:
            exists, _up, mtu = _iface(root, nd)
            if exists and mtu is not None and mtu < RECOMMENDED_MTU:
                rep.warnings.append(
                    f"MTU of {nd} ({h.name}) is {mtu}: RoCE needs jumbo frames for full speed; fix: "
                    f"sudo ip link set dev {nd} mtu {RECOMMENDED_MTU} (on both nodes, same MTU; persist it in "
                    "netplan / NetworkManager)")
            elif exists and mtu is not None:
                rep.info.append(f"MTU of {nd} ({h.name}): {mtu}")
    # ---- GID index ---------------------------------------------------------------------------------
    gid_env = env.get("NCCL_IB_GID_INDEX")
    for h in used_active:
        if h.gid_index is None:
            rep.warnings.append(
                f"{h.name} has no RoCE v2 GID with an IPv4 address: give its netdev {h.netdev} an IPv4 address "
                "(RoCE v2 needs it to route between the nodes).")
        elif gid_env is not None and gid_env.strip() != str(h.gid_index):
            rep.warnings.append(
                f"NCCL_IB_GID_INDEX={gid_env} but the RoCE v2 IPv4-mapped GID of {h.name} is at index {h.gid_index}; "
                f"fix: export NCCL_IB_GID_INDEX={h.gid_index}"
                + (" (the devices differ: unset it and let NCCL >= 2.21 choose per device)"
                   if len({x.gid_index for x in used_active}) > 1 else ""))
    # ---- bootstrap / gloo interfaces -----------------------------------------------------------------
    ifaces = _interfaces(root)
    sock = env.get("NCCL_SOCKET_IFNAME")
    if sock:
        exclude, exact, names = parse_nccl_list(sock)
        if not exclude:
            match = [i for i in ifaces if nccl_selects(i, sock)]
            up = [i for i in match if _iface(root, i)[1]]
            if not match:
                rep.warnings.append(f"NCCL_SOCKET_IFNAME={sock}: no such interface here "
                                    f"(found: {', '.join(ifaces) or 'none'}); fix: export NCCL_SOCKET_IFNAME=<the netdev "
                                    "of the link between the nodes>")
            elif not up:
                rep.warnings.append(f"NCCL_SOCKET_IFNAME={sock}: {', '.join(match)} is down; fix: sudo ip link set "
                                    f"dev {match[0]} up")
            else:
                rep.info.append(f"NCCL_SOCKET_IFNAME={sock}: {', '.join(up)} up")
    gloo = env.get("GLOO_SOCKET_IFNAME")
    if gloo:
        for name in [x.strip() for x in gloo.split(",") if x.strip()]:
            exists, up, _ = _iface(root, name)
            if not exists:
                rep.warnings.append(f"GLOO_SOCKET_IFNAME={gloo}: interface {name} does not exist here "
                                    f"(found: {', '.join(ifaces) or 'none'}); gloo (CPU collectives) would fail")
            elif not up:
                rep.warnings.append(f"GLOO_SOCKET_IFNAME={gloo}: interface {name} is down; fix: sudo ip link set "
                                    f"dev {name} up")
            else:
                rep.info.append(f"GLOO_SOCKET_IFNAME={name}: up")
    if hcas or expect_rdma:
        rep.info.append(gpudirect_facts(env, root, proc, cuda_dmabuf))
    return rep


def cuda_dmabuf_supported() -> Optional[bool]:
    """CUDA's CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED (124) for device 0 through the driver API, None when unreadable."""
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return None
        dev, val = ctypes.c_int(), ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(val), 124, dev) != 0:
            return None
        return bool(val.value)
    except (OSError, AttributeError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kd.ops.netcheck", description=__doc__.split("\n")[0])
    p.add_argument("--prefix", default="[kd launch]   ")
    p.add_argument("--expect-rdma", action="store_true", help="a multi-node GPU run: no RDMA device is a warning")
    a = p.parse_args(argv)
    rep = nccl_report(expect_rdma=a.expect_rdma)
    print("\n".join(rep.lines(a.prefix)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
