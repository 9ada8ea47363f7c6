"""The real-guest harness against QEMU's built-in virtio devices.

These boot a Linux 6.1 guest under QEMU 7.2/TCG (a few seconds each) and
need root, so they are deselected by default; run them with

    .venv/bin/pytest -m guest tests/test_guest.py -s

(-s shows the measured boot time and iperf3 throughput). They prove the
harness itself (boot, serial command loop, namespace networking, cleanup)
with QEMU's own virtio-net and virtio-blk, the baseline our vhost-user
backends are later compared against.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.harness import (
    Guest,
    GuestTimeout,
    NetNamespace,
    build_initramfs,
    builtin_blk_args,
    builtin_net_args,
    find_kernel,
    netns_exists,
    vhost_user_blk_args,
    vhost_user_net_args,
)

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements("iperf3", "ip", why_root="network namespaces, TAP devices")
    if reason:
        pytest.skip(reason)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


@pytest.fixture
def leak_check() -> Iterator[list[object]]:
    """Collects Guests and NetNamespaces; after the test asserts none of them left anything behind."""
    things: list[object] = []
    yield things
    for thing in things:
        if isinstance(thing, Guest):
            assert thing.pid is not None
            assert not pid_alive(thing.pid), f"qemu pid {thing.pid} still running"
        elif isinstance(thing, NetNamespace):
            assert not netns_exists(thing.name), f"netns {thing.name} still exists"
            assert not _link_exists(thing.tap), f"TAP {thing.tap} leaked into the root namespace"


def test_guest_boots_and_runs_commands_over_serial(leak_check: list[object], tmp_path: Path) -> None:
    t0 = time.monotonic()
    initrd = build_initramfs()
    guest = Guest(initrd=initrd, log_dir=tmp_path)
    leak_check.append(guest)
    with guest:
        print(f"\nboot time: {guest.boot_seconds:.2f} s (QEMU start to control loop ready)")
        assert guest.run("uname -r") == (0, find_kernel().version)
        assert guest.run("echo out; echo err >&2; exit 3") == (3, "out\nerr")
        assert guest.run("printf no-newline") == (0, "no-newline")
        # A command that outlives its timeout does not desynchronise later ones.
        with pytest.raises(GuestTimeout):
            guest.run("sleep 2; echo late", timeout=0.5)
        assert guest.run("echo next", timeout=10) == (0, "next")
        assert "virtio_net" in guest.check("cat /proc/modules")
    assert "@@PYVIRTIO-READY@@" in (tmp_path / "serial.log").read_text()
    print(f"test time: {time.monotonic() - t0:.1f} s")


def test_builtin_virtio_net_ping_and_iperf3_tcp_tx(leak_check: list[object], tmp_path: Path) -> None:
    t0 = time.monotonic()
    ns = NetNamespace()
    leak_check.append(ns)
    with ns:
        guest = Guest(
            device_args=builtin_net_args(ns.tap, vectors0=True),
            ip=ns.guest_cidr,
            netns=ns.name,
            log_dir=tmp_path,
        )
        leak_check.append(guest)
        with guest:
            print(f"\nboot time: {guest.boot_seconds:.2f} s")
            # Link up: the driver bound, eth0 is up and has carrier.
            assert guest.check("cat /sys/class/net/eth0/operstate") == "up"
            assert ns.guest_ip in guest.check("ip -4 addr show dev eth0")
            rc, out = guest.run(f"ping -c 3 -W 2 {ns.host_ip}", timeout=20)
            assert rc == 0, out
            assert "3 packets received" in out

            server = ns.popen(
                ["iperf3", "-s", "-1", "-B", ns.host_ip, "-p", "5201"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_listening(ns, 5201)
            rc, out = guest.run(f"iperf3 -c {ns.host_ip} -p 5201 -t 3 -J", timeout=60)
            assert rc == 0, out
            result = json.loads(out)
            gbps = result["end"]["sum_sent"]["bits_per_second"] / 1e9
            print(f"iperf3 TCP guest->host, built-in virtio-net (vectors=0, TCG): {gbps:.3f} Gbit/s")
            assert gbps > 0
            assert server.wait(10) == 0
    print(f"test time: {time.monotonic() - t0:.1f} s")


def _wait_listening(ns: NetNamespace, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on port {port} in {ns.name}")


def test_builtin_virtio_blk_write_pattern_and_read_back(leak_check: list[object], tmp_path: Path) -> None:
    t0 = time.monotonic()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    # tmp_path may be on tmpfs, which has no O_DIRECT: let QEMU use the page cache then.
    guest = Guest(device_args=builtin_blk_args(image, cache="writeback"), log_dir=tmp_path)
    leak_check.append(guest)
    with guest:
        assert guest.check("cat /sys/block/vda/size") == str((64 << 20) // 512)
        # 8 MiB of random data at a 1 MiB offset, written and read back with O_DIRECT so both
        # directions go through the device rather than the guest page cache.
        guest.check("dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null")
        guest.check("dd if=/tmp/pattern of=/dev/vda bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null")
        guest.check("dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=8 iflag=direct 2>/dev/null")
        guest.check("cmp /tmp/pattern /tmp/back")
        guest_md5 = guest.check("md5sum /tmp/pattern").split()[0]
    # What the guest wrote is in the host image file, at the right place.
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert hashlib.md5(f.read(8 << 20)).hexdigest() == guest_md5
    print(f"\ntest time: {time.monotonic() - t0:.1f} s")


def test_vhost_user_args_use_intx_and_a_client_socket() -> None:
    net = vhost_user_net_args("/run/a,b.sock", mq=2)
    assert net[:2] == ["-chardev", "socket,id=net0-chr,path=/run/a,,b.sock,reconnect=1"]
    assert net[2:4] == ["-netdev", "vhost-user,id=net0,chardev=net0-chr,queues=2"]
    assert "vectors=0" in net[5] and "mq=on" in net[5]
    blk = vhost_user_blk_args("/run/blk.sock", reconnect=None)
    assert blk == [
        "-chardev",
        "socket,id=blk0-chr,path=/run/blk.sock",
        "-device",
        "vhost-user-blk-pci,chardev=blk0-chr,vectors=0,num-queues=1",
    ]
