"""The live-migration harness without a guest: the destination QEMU is the
source's machine with its own devices, and QEMU's migration answer is read
right. (The migrations themselves: tests/test_guest_migration.py, -m guest.)"""

from __future__ import annotations

from pathlib import Path

from pyvirtio.bench.harness import Guest, KernelInfo
from pyvirtio.bench.harness.migration import MigrationResult, destination


def _argv(g: Guest, sock: str) -> list[str]:
    g._qmp_path = f"/run/{sock}/qmp.sock" if g.want_qmp else None  # set by start() otherwise
    return g.command_line(f"/run/{sock}/serial.sock", Path("/boot/vmlinux"), Path("/cache/initrd.gz"))


def test_destination_is_the_source_machine_with_its_own_devices_and_incoming_defer() -> None:
    kernel = KernelInfo(Path("/boot/vmlinuz-6.1"), "6.1", Path("/lib/modules/6.1"))
    src = Guest(device_args=["-device", "src-dev"], smp=2, memory_mib=384, ip="10.0.0.2/24",
                append="init_on_alloc=0", kernel=kernel, initrd=Path("/cache/initrd.gz"), netns="ns1",
                extra_args=["-rtc", "base=utc"], qmp=True)
    dst = destination(src, device_args=["-device", "dst-dev"])
    for attr in ("smp", "memory_mib", "ip", "append", "netns", "kernel", "initrd", "machine", "cpu", "accel"):
        assert getattr(dst, attr) == getattr(src, attr), attr
    a, b = _argv(src, "a"), _argv(dst, "b")
    assert b[-2:] == ["-incoming", "defer"] and "-incoming" not in a
    assert [x.replace("/run/b/", "/run/a/").replace("dst-dev", "src-dev") for x in b[:-2]] == a
    assert "-S" not in b
    paused = destination(src, device_args=[], paused=True)
    assert "-S" in _argv(paused, "c") and "-S" not in src.extra_args


def test_migration_result_reads_query_migrate() -> None:
    info = {"status": "completed", "total-time": 7581, "downtime": 9, "setup-time": 3,
            "ram": {"transferred": 177209344, "dirty-sync-count": 7, "normal": 43000, "duplicate": 90000}}
    r = MigrationResult.from_query(info, wall_ms=7600)
    assert (r.total_time_ms, r.downtime_ms, r.setup_time_ms) == (7581, 9, 3)
    assert (r.transferred, r.dirty_sync_count, r.normal_pages, r.zero_pages, r.wall_ms) == (
        177209344, 7, 43000, 90000, 7600)
