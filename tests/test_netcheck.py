"""kd.ops.netcheck on a fake /sys + /proc tree (KD_SYSFS_ROOT / KD_PROCFS_ROOT): a DGX Spark's ConnectX-7 port as
two RDMA devices (rocep1s0f0 at 0000:01:00.0, roceP2p1s0f0 at 0002:01:00.0), with both halves named, one half
named, MTU 1500, a wrong GID index, a missing socket interface; and launch/nccl_env.sh on the same tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kd.ops.netcheck import nccl_report, nccl_selects

REPO = Path(__file__).resolve().parents[1]
HALVES = (("rocep1s0f0", "0000:01:00.0", "enp1s0f0np0", "c0a8:640a"),
          ("roceP2p1s0f0", "0002:01:00.0", "enP2p1s0f0np0", "c0a8:650a"))


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


def fake_sys(root: Path, *, mtu=9000, second_state="ACTIVE", gid_index=3, halves=HALVES, extra_ifaces=("lo",)):
    """A sysfs tree with the RDMA devices and netdevs of one DGX Spark ConnectX-7 port (two PCIe halves)."""
    for i, (name, pci, netdev, ip) in enumerate(halves):
        dev = root / "devices" / f"pci{pci[:4]}:00" / pci
        (dev / "net" / netdev).mkdir(parents=True, exist_ok=True)
        ib = root / "class" / "infiniband" / name
        ib.mkdir(parents=True, exist_ok=True)
        os.symlink(dev, ib / "device")
        port = ib / "ports" / "1"
        state = "ACTIVE" if i == 0 else second_state
        _write(port / "state", f"{4 if state == 'ACTIVE' else 1}: {state}")
        _write(port / "link_layer", "Ethernet")
        _write(port / "rate", "100 Gb/sec (2X NDR)")
        for g in range(4):  # 0/1 RoCE v1/v2 link-local, 2/3 RoCE v1/v2 IPv4-mapped
            _write(port / "gid_attrs" / "types" / str(g), "IB/RoCE v1" if g % 2 == 0 else "RoCE v2")
            gid = "fe80:0000:0000:0000:0000:0000:0000:0001" if g < 2 else f"0000:0000:0000:0000:0000:ffff:{ip}"
            _write(port / "gids" / str(g), gid)
        if gid_index != 3:  # move the IPv4 RoCE v2 GID
            _write(port / "gids" / "3", "fe80:0000:0000:0000:0000:0000:0000:0002")
            _write(port / "gid_attrs" / "types" / str(gid_index), "RoCE v2")
            _write(port / "gids" / str(gid_index), f"0000:0000:0000:0000:0000:ffff:{ip}")
        nd = root / "class" / "net" / netdev
        _write(nd / "operstate", "up" if state == "ACTIVE" else "down")
        _write(nd / "flags", "0x1003" if state == "ACTIVE" else "0x1002")
        _write(nd / "mtu", str(mtu))
    for name in extra_ifaces:
        _write(root / "class" / "net" / name / "operstate", "unknown")
        _write(root / "class" / "net" / name / "flags", "0x9")
        _write(root / "class" / "net" / name / "mtu", "65536")
    return root


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    def make(**kw):
        root = fake_sys(tmp_path / "sys", **kw)
        proc = tmp_path / "proc"
        _write(proc / "sys" / "kernel" / "osrelease", "6.17.0-1029-nvidia")
        _write(proc / "driver" / "nvidia" / "version",
               "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  580.95.05  Release Build")
        monkeypatch.setenv("KD_SYSFS_ROOT", str(root))
        monkeypatch.setenv("KD_PROCFS_ROOT", str(proc))
        return root
    return make


ENV2 = {"NCCL_IB_HCA": "rocep1s0f0,roceP2p1s0f0", "NCCL_SOCKET_IFNAME": "enp1s0f0np0", "GLOO_SOCKET_IFNAME": "enp1s0f0np0",
        "NCCL_IB_GID_INDEX": "3"}


def test_nccl_list_syntax():
    assert nccl_selects("rocep1s0f0", "rocep1s0f0,roceP2p1s0f0")
    assert nccl_selects("roceP2p1s0f0", "roce")  # prefix
    assert not nccl_selects("roceP2p1s0f0", "=roce")  # exact
    assert not nccl_selects("rocep1s0f0", "^rocep1")  # exclusion
    assert nccl_selects("rocep1s0f0", "rocep1s0f0:1")  # port suffix


def test_two_halves_ok(fake):
    fake()
    rep = nccl_report(ENV2, expect_rdma=True)
    assert rep.warnings == [], rep.warnings
    text = "\n".join(rep.info)
    assert "RDMA rocep1s0f0: ACTIVE Ethernet, netdev enp1s0f0np0, PCI 0000:01:00.0" in text
    assert "RoCE v2 IPv4 GID index 3 (192.168.100.10)" in text and "[used by NCCL]" in text
    assert "MTU of enP2p1s0f0np0 (roceP2p1s0f0): 9000" in text
    assert "GPUDirect RDMA: unknown (DMA-BUF possible" in text and "nvidia_peermem not loaded" in text


def test_one_half_warns_with_the_export_line(fake):
    fake()
    rep = nccl_report(dict(ENV2, NCCL_IB_HCA="rocep1s0f0"), expect_rdma=True)
    w = [x for x in rep.warnings if "other half of the same port" in x]
    assert len(w) == 1, rep.warnings
    assert "not roceP2p1s0f0" in w[0] and "fix: export NCCL_IB_HCA=rocep1s0f0,roceP2p1s0f0 (on every node)" in w[0]


def test_second_half_down_warns(tmp_path, monkeypatch):
    root = fake_sys(tmp_path / "sys", second_state="DOWN")
    monkeypatch.setenv("KD_SYSFS_ROOT", str(root))
    monkeypatch.setenv("KD_PROCFS_ROOT", str(tmp_path / "noproc"))
    rep = nccl_report({}, expect_rdma=True)
    assert any("roceP2p1s0f0 (the other half of rocep1s0f0's port" in w and "is DOWN" in w
               and "sudo ip link set dev enP2p1s0f0np0 up" in w for w in rep.warnings), rep.warnings
    assert any(l.startswith("GPUDirect RDMA: unknown [") for l in rep.info), rep.info  # nothing readable: unknown


def test_mtu_1500_warns_with_the_fix(fake):
    fake(mtu=1500)
    rep = nccl_report(ENV2, expect_rdma=True)
    mtu = [w for w in rep.warnings if w.startswith("MTU of")]
    assert len(mtu) == 2, rep.warnings
    assert "sudo ip link set dev enp1s0f0np0 mtu 9000" in mtu[0] and "is 1500" in mtu[0]


def test_gid_index_and_interfaces(fake):
    fake(gid_index=5)
    env = dict(ENV2, NCCL_SOCKET_IFNAME="eth9", GLOO_SOCKET_IFNAME="eth9")
    rep = nccl_report(env, expect_rdma=True)
    ws = "\n".join(rep.warnings)
    assert "NCCL_IB_GID_INDEX=3 but the RoCE v2 IPv4-mapped GID of rocep1s0f0 is at index 5" in ws
    assert "export NCCL_IB_GID_INDEX=5" in ws
    assert "NCCL_SOCKET_IFNAME=eth9: no such interface" in ws and "GLOO_SOCKET_IFNAME=eth9: interface eth9 does not exist" in ws


def test_wrong_hca_name_and_no_rdma(fake, tmp_path, monkeypatch):
    fake()
    rep = nccl_report(dict(ENV2, NCCL_IB_HCA="mlx5_0"), expect_rdma=True)
    assert any("NCCL_IB_HCA names 'mlx5_0' but there is no such RDMA device" in w for w in rep.warnings), rep.warnings
    monkeypatch.setenv("KD_SYSFS_ROOT", str(tmp_path / "empty"))
    rep = nccl_report({}, expect_rdma=True)
    assert any("no RDMA device" in w and "TCP sockets" in w for w in rep.warnings)
    assert not nccl_report({}, expect_rdma=False).warnings  # CPU / gloo runs: a note only


def test_peermem_and_dmabuf_off(fake):
    root = fake()
    rep = nccl_report(dict(ENV2, NCCL_DMABUF_ENABLE="0"))
    assert any("GPUDirect RDMA: no: NCCL_DMABUF_ENABLE=0" in l for l in rep.info), rep.info
    (root / "module" / "nvidia_peermem").mkdir(parents=True)
    rep = nccl_report(ENV2)
    assert any("GPUDirect RDMA: likely (nvidia_peermem is loaded)" in l for l in rep.info), rep.info


def _source_nccl_env(tmp_path, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_"))}
    env.update(env_extra)
    r = subprocess.run(["bash", "-c", f". {REPO}/launch/nccl_env.sh; echo IB=$NCCL_IB_HCA GID=$NCCL_IB_GID_INDEX "
                                      f"SOCK=$NCCL_SOCKET_IFNAME"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_nccl_env_sh_on_the_fake_tree(fake, tmp_path):
    root = fake(mtu=1500)
    out = _source_nccl_env(tmp_path, {"KD_SYSFS_ROOT": str(root), "KD_PROCFS_ROOT": str(tmp_path / "proc")})
    # both halves detected and named; the MTU warning with its fix is printed by the launcher
    assert "IB=rocep1s0f0,roceP2p1s0f0 GID=3 SOCK=enp1s0f0np0" in out, out
    assert "[kd launch]   WARNING: MTU of enp1s0f0np0 (rocep1s0f0) is 1500" in out, out
    out = _source_nccl_env(tmp_path, {"KD_SYSFS_ROOT": str(root), "NCCL_IB_HCA": "rocep1s0f0"})
    assert "WARNING: NCCL_IB_HCA=rocep1s0f0 uses rocep1s0f0 but not roceP2p1s0f0" in out, out
    assert "export NCCL_IB_HCA=rocep1s0f0,roceP2p1s0f0" in out
