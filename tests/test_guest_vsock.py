"""virtio-vsock over vhost-user with a real guest: Linux 6.1's
vmw_vsock_virtio_transport under QEMU 7.2 (TCG, `vhost-user-vsock-pci`,
`vectors=0`), `socat` in the guest, host programs on the hybrid Unix
sockets of `pyvirtio vsock`.

- several connections each way at the same time move tens of MiB of random
  bytes, each connection's sha256 equal on both ends (nothing lost or
  reordered);
- a guest connecting to a host port without a socket is refused (the
  device's RST: ECONNRESET in Linux), and the back-end serves the next
  connection;
- after the guest's driver is unloaded and loaded again (a device reset,
  the rings set up anew), connections work again;
- `pyvirtio bench guest-vsock` prints its table.

Deselected by default (root, QEMU, a kernel); run with

    .venv/bin/pytest -m guest tests/test_guest_vsock.py -s
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.guest_vsock import (
    VSOCK_BINARIES,
    VSOCK_MODULES,
    VsockBenchConfig,
    exchange,
    vsock_device,
)
from pyvirtio.bench.harness import Guest, build_initramfs

pytestmark = pytest.mark.guest

MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements("socat")
    if reason:
        pytest.skip(reason)


def test_concurrent_connections_each_way_move_checksummed_bytes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    pid = None
    initrd = build_initramfs(modules=VSOCK_MODULES, binaries=VSOCK_BINARIES)
    try:
        with (vsock_device(VsockBenchConfig(), tmp_path) as dev,
              Guest(device_args=dev.device_args, memory_mib=512, initrd=initrd, log_dir=tmp_path) as g):
            pid = dev.pid
            assert "0x0013" in g.check("cat /sys/bus/virtio/devices/*/device")  # virtio-vsock, bound:
            assert "vmw_vsock_virtio_transport" in g.check("ls /sys/bus/virtio/drivers")
            # 4 connections each way, 6 MiB each: 48 MiB, all at once
            results = exchange(g, dev.uds_path, to_host=4, to_guest=4, size=6 * MiB)
            # refused, then the device goes on
            rc, out = g.run("socat -u - VSOCK-CONNECT:2:4444 </dev/null", timeout=30)
            assert rc != 0 and "connection reset by peer" in out.lower(), out  # Linux: RST while connecting
            again = exchange(g, dev.uds_path, to_host=1, size=1 * MiB)
            # the driver resets the device and probes it again: the rings restart, sockets work again
            g.check("rmmod vmw_vsock_virtio_transport && modprobe vmw_vsock_virtio_transport", timeout=60)
            reloaded = exchange(g, dev.uds_path, to_host=1, to_guest=1, size=1 * MiB)
    finally:
        if pid is not None:
            assert not pid_alive(pid), "back-end still running"
    assert [(r["direction"], r["connections"], r["intact"]) for r in results] == [
        ("guest->host", 4, True), ("host->guest", 4, True)]
    assert again[0]["intact"] and all(r["intact"] for r in reloaded)
    print(f"\n{results}\ntest time {time.monotonic() - t0:.1f} s")


def test_vsock_bench_prints_both_directions(tmp_path: Path) -> None:
    from pyvirtio.bench.guest_vsock import format_table, run

    res = run(VsockBenchConfig(mib=4, connections=(1, 2), work_dir=tmp_path))
    table = format_table(res)
    print("\n" + table)
    assert [(r["direction"], r["connections"]) for r in res] == [
        ("guest->host", 1), ("host->guest", 1), ("guest->host", 2), ("host->guest", 2)]
    assert all(r["MiBps"] > 0.1 for r in res)
    assert list(tmp_path.iterdir()) == []  # the work directory (sockets, logs) is gone
