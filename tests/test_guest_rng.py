"""virtio-rng over vhost-user with a real guest: Linux 6.1's virtio_rng
driver under QEMU 7.2 (TCG, `vhost-user-rng-pci`, `vectors=0`).

- the guest's hwrng is our device and /dev/hwrng gives exactly the bytes
  of the `--source` file (a seeded random pattern, found in the file);
- `--max-bytes-per-second` holds in the guest;
- Linux 6.1's driver never asks again after a zero-byte answer (a dry source);
- `pyvirtio bench guest-rng` measures ours and QEMU's virtio-rng-pci.

Deselected by default (root, QEMU, a kernel); run with

    .venv/bin/pytest -m guest tests/test_guest_rng.py -s
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.guest_rng import RNG_MODULES, RngBenchConfig, read_hwrng, rng_device
from pyvirtio.bench.harness import Guest, build_initramfs

pytestmark = pytest.mark.guest

KiB = 1 << 10
SYSFS = "/sys/class/misc/hw_random"


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)


def _hex_bytes(od_output: str) -> bytes:
    """The bytes `od -An -v -tx1` printed."""
    return bytes.fromhex("".join(od_output.split()))


def test_guest_hwrng_reads_exactly_the_source_bytes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    source = tmp_path / "pattern.bin"
    data = random.Random(15).randbytes(1024 * KiB)
    source.write_bytes(data)
    cfg = RngBenchConfig(source=str(source))
    pid = None
    try:
        with (rng_device("pyvirtio", cfg, tmp_path) as (device_args, pid),
              Guest(device_args=device_args, initrd=build_initramfs(modules=RNG_MODULES), log_dir=tmp_path) as g):
            assert g.check(f"cat {SYSFS}/rng_current").startswith("virtio_rng")
            assert g.check(f"cat {SYSFS}/rng_available").split() == [g.check(f"cat {SYSFS}/rng_current")]
            # no more reads by the kernel's hwrng thread: from here on, only dd consumes the device
            g.check(f"echo 0 > {SYSFS}/rng_quality")
            seconds = read_hwrng(g, 16 * KiB, out="/tmp/rng.out")
            got = _hex_bytes(g.check("od -An -v -tx1 /tmp/rng.out", timeout=60))
            odd = g.check("dd if=/dev/hwrng bs=100 count=3 iflag=fullblock 2>/dev/null | od -An -v -tx1")
    finally:
        if pid is not None:
            assert not pid_alive(pid), "back-end still running"
    assert len(got) == 16 * KiB
    at = data.find(got)
    assert at >= 0, "the guest read bytes that are not a slice of the source"
    assert at < 4 * KiB  # only the kernel's early reads came before
    # Reads of a size other than a multiple of 64 get the next bytes too, but the kernel's hwrng
    # core hands each 64-byte chunk out from its end, so only the bytes, not their order, can be checked.
    assert not Counter(_hex_bytes(odd)) - Counter(data[at + len(got): at + len(got) + 320])
    print(f"\n16 KiB read in {seconds:.2f} s (guest time), found at source offset {at}; "
          f"test time {time.monotonic() - t0:.1f} s")


def test_rate_limit_holds_for_a_guest_reader(tmp_path: Path) -> None:
    rate = 4 * KiB
    cfg = RngBenchConfig(pyvirtio_args=("--max-bytes-per-second", str(rate)))
    with (rng_device("pyvirtio", cfg, tmp_path) as (device_args, _pid),
          Guest(device_args=device_args, initrd=build_initramfs(modules=RNG_MODULES), log_dir=tmp_path) as g):
        g.check(f"echo 0 > {SYSFS}/rng_quality")
        seconds = read_hwrng(g, 16 * KiB)
    print(f"\n16 KiB at {rate} B/s: {seconds:.2f} s")
    assert 16 * KiB / seconds < 1.5 * rate  # one second of burst, then the rate
    assert seconds > 2.5


def test_linux_driver_stops_asking_after_an_empty_answer(tmp_path: Path) -> None:
    """Why rng.py warns about sources that run dry: the first request (the
    driver's, at probe) finds an empty FIFO and is answered with 0 bytes
    after --max-wait; bytes written later are never asked for."""
    fifo = tmp_path / "empty.fifo"
    os.mkfifo(fifo)
    stats = tmp_path / "stats.jsonl"
    cfg = RngBenchConfig(source=str(fifo), pyvirtio_args=("--max-wait", "0.3", "--stats-file", str(stats)))
    w = None
    try:
        with rng_device("pyvirtio", cfg, tmp_path) as (device_args, _pid):
            w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a writer that has nothing yet
            with Guest(device_args=device_args, initrd=build_initramfs(modules=RNG_MODULES), log_dir=tmp_path) as g:
                assert g.check(f"cat {SYSFS}/rng_current").startswith("virtio_rng")
                time.sleep(1.5)  # the probe's request was answered (empty) after --max-wait
                os.write(w, bytes(4096))
                rc, _ = g.run("timeout 3 dd if=/dev/hwrng of=/dev/null bs=64 count=1", timeout=30)
    finally:
        if w is not None:
            os.close(w)
    assert rc != 0  # dd was still waiting when `timeout` killed it
    exit_stats = json.loads(stats.read_text().splitlines()[-1])
    assert exit_stats["event"] == "exit" and exit_stats["totals"]["packets"] == 1


def test_rng_bench_measures_ours_and_qemu_builtin(tmp_path: Path) -> None:
    from pyvirtio.bench.guest_rng import format_table, run

    res = run(RngBenchConfig(kib=64, work_dir=tmp_path))
    table = format_table(res)
    print("\n" + table)
    assert [r["target"] for r in res] == ["pyvirtio", "builtin"]
    for r in res:
        assert r["hwrng"].startswith("virtio_rng") and r["KiBps"] > 1
    assert "xbuiltin" in table and table.splitlines()[2].endswith("1.00")
    assert list(tmp_path.iterdir()) == []  # the work directory (sockets, logs) is gone
