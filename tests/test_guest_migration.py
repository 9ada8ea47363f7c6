"""Live migration with a real guest: QEMU 7.2 (TCG) moves a running Linux
guest to a second QEMU on this host (`-incoming defer`, a unix socket, QMP)
while the guest works, and the guest carries on there.

blk: the disk is pyvirtio's vhost-user-blk back-end (one per QEMU, both on
the same image file), or QEMU's built-in virtio-blk for the baseline. During
the migration the guest
- writes a known pattern with three O_DIRECT writers (`dd oflag=direct
  conv=fsync`) to distinct 1 MiB regions, each read back (O_DIRECT) at once;
- reads a host-generated area of the disk through the page cache (buffered
  `dd`, caches dropped first): the device writes those pages into guest RAM
  while QEMU copies the RAM to the destination.
Only the back-end knows which guest pages it wrote: unless it marks them in
the dirty log QEMU gave it (VHOST_F_LOG_ALL, SET_LOG_BASE), QEMU copies a
page before the device fills it and never again, and the guest on the
destination finds stale bytes in its page cache. So after the migration the
destination checksums the cached area again (without dropping caches; the
disk's read counter shows it came from the cache, not the device), every
acknowledged write is read back (and its bytes on the host), dmesg has no
I/O error, and the source back-end's exit stats show it marked pages.

net: pyvirtio's vhost-user-net (or QEMU's virtio-net) on a TAP; the
destination's back-end has its own TAP, both in one learning bridge inside a
private namespace. The host streams random data into the guest at 3 MiB/s
across the migration; it goes on through the destination, and the guest's
md5 of the whole stream matches the host's.

Every test also compares the guest's RAM exactly: the destination starts
paused (`-S`), the RAM of both is read from their shared memory files, and
the pages that differ are split by who wrote them. The source back-end
lists every page it wrote (PYVIRTIO_TEST_DIRTY_TRACE=1, a test-only
switch): not one of those may differ (that would be a write logged too late
or not at all). A page it never wrote was written by the vCPUs, whose
writes QEMU tracks itself; under TCG QEMU loses one or two of those now and
then, with its own devices too (the baselines below: 2 pages in one run of
~20), so up to RAM_LOSS_TOLERATED of them are printed, not failed on. Such a
lost page can also trip the guest's own checks (it held a buffer dd was
about to write, or a file it compares): a migration that fails when QEMU
lost vCPU pages and the back-end none runs once more, and that run decides. Then
the destination runs. (Read, not dumped with
`pmemsave`: dumping both took ~8 s, and a TCP sender whose peer is stopped
that long backs its retransmission timer off to ~7 s, so the net stream
could not resume within the seconds the test watches after `cont`.) The guest boots with `init_on_alloc=0`:
Debian's kernel otherwise zeroes every page it allocates, a CPU write that
QEMU tracks itself and that would hide an unlogged device write to a page.
The migration bandwidth is capped (24 MiB/s) so that QEMU makes several
passes while the guest works.

Not vacuous: the same migrations with the source back-end told to log
nothing (PYVIRTIO_TEST_SKIP_DIRTY_LOG=1, a test-only switch) must find
differing RAM pages, and for blk stale page-cache data too (net: the
stream's checksum usually differs as well; printed).

Deselected by default (root, QEMU, a kernel); about 35 s each; run with

    .venv/bin/pytest -m guest tests/test_guest_migration.py -s
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.harness import (
    Guest,
    NetNamespace,
    PyvirtioNetBackend,
    builtin_blk_args,
    builtin_net_args,
    netns_exists,
    vhost_user_blk_args,
    vhost_user_net_args,
)
from pyvirtio.bench.harness.migration import MigrationResult, destination, migrate, ram_diff
from test_guest_blk import BackendProcess, _exit_stats, cleanup  # noqa: F401

pytestmark = pytest.mark.guest

MiB = 1 << 20
READ_MIB = 192  # the host-known area the guest reads through its page cache: MiB [0, READ_MIB)
WRITE_REGIONS = 48  # 1 MiB regions the writers cycle through: MiB [READ_MIB, READ_MIB + WRITE_REGIONS)
WINDOWS = 24  # region r, pass p holds /tmp/pat bytes [((r + p) % 24) * 256 KiB, + 1 MiB)
IMAGE_MIB = READ_MIB + WRITE_REGIONS
#: Migration bandwidth cap (bytes/s): slow enough for QEMU to make several RAM
#: passes while the guest reads, fast enough to converge under TCG.
MAX_BANDWIDTH = 24 * MiB
#: The reader's pause between 1 MiB reads (µs): the area lasts through the migration.
READ_PAUSE_US = 60000
SKIP_DIRTY_LOG = "PYVIRTIO_TEST_SKIP_DIRTY_LOG"
DIRTY_TRACE = "PYVIRTIO_TEST_DIRTY_TRACE"
#: pages the vCPUs wrote that may differ after the move (QEMU's own loss under
#: TCG, seen with its built-in devices); an unlogged back-end makes 100s
RAM_LOSS_TOLERATED = 4


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)


def _image(tmp_path: Path) -> tuple[Path, list[str]]:
    """The disk: a random read area (its per-MiB md5s returned) and a zeroed write area."""
    p = tmp_path / "disk.img"
    md5s = []
    with open(p, "wb") as f:
        for _ in range(READ_MIB):
            chunk = os.urandom(MiB)
            md5s.append(hashlib.md5(chunk).hexdigest())
            f.write(chunk)
        f.truncate(IMAGE_MIB * MiB)
    return p, md5s


def _backend(tmp_path: Path, image: Path, name: str, *, skip_log: bool = False) -> BackendProcess:
    sock = tmp_path / f"{name}.sock"
    env = ["env", f"{DIRTY_TRACE}=1", *([f"{SKIP_DIRTY_LOG}=1"] if skip_log else [])]  # skip: the source alone
    argv = [*env, sys.executable, "-m", "pyvirtio", "-v", "blk", "--socket-path", str(sock),
            "--blk-file", str(image), "--queues", "1"]
    return BackendProcess(argv, sock, tmp_path, name=name)


# The guest's workload, started in the background on the source; it runs until
# /tmp/stop appears (on the destination) and then writes /tmp/wl.end.
# wr K BS: writer K writes regions K, K+3, ... (pass p: pattern window (r+p) % 24)
# with BS-byte O_DIRECT writes and fsync, reads each back at once (O_DIRECT), logs
# "r p" to /tmp/done when the write was acknowledged. rd: reads MiB c = 0, 1, ...
# of the read area through the page cache, logs c to /tmp/rdone.
WORKLOAD = (
    "wr() { k=$1; bs=$2; n=$((1048576 / bs)); p=0; while [ ! -e /tmp/stop ]; do r=$k; "
    f"while [ $r -lt {WRITE_REGIONS} ] && [ ! -e /tmp/stop ]; do "
    f"s=$(( ((r + p) % {WINDOWS}) * 262144 / bs )); o=$(( ({READ_MIB} + r) * n )); "
    "if dd if=/tmp/pat of=/dev/vda bs=$bs skip=$s seek=$o count=$n oflag=direct conv=fsync 2>/tmp/err$k; "
    "then echo $r $p >> /tmp/done; else echo WFAIL $r; cat /tmp/err$k; fi; "
    "dd if=/tmp/pat of=/tmp/e$k bs=$bs skip=$s count=$n 2>/dev/null; "
    "dd if=/dev/vda of=/tmp/g$k bs=$bs skip=$o count=$n iflag=direct 2>/tmp/err$k || echo RFAIL $r; "
    "cmp -s /tmp/e$k /tmp/g$k || echo VFAIL $r $p; r=$((r + 3)); done; p=$((p + 1)); done; }; "
    f"rd() {{ c=0; while [ $c -lt {READ_MIB} ] && [ ! -e /tmp/stop ]; do "
    "dd if=/dev/vda of=/dev/null bs=1048576 skip=$c count=1 2>/dev/null || echo RDFAIL $c; "
    "echo $c >> /tmp/rdone; c=$((c + 1)); usleep $1; done; }; "
    "rm -f /tmp/stop /tmp/done /tmp/rdone /tmp/wl.end; touch /tmp/done /tmp/rdone; "
    # Linux drops a block device's page cache when its last opener closes it: hold it open
    "sleep 100000 < /dev/vda > /dev/null 2>&1 & "
    "sync; echo 3 > /proc/sys/vm/drop_caches; "
    "( wr 0 65536 & wr 1 16384 & wr 2 4096 & rd {pause} & wait; echo end > /tmp/wl.end ) > /tmp/wl.log 2>&1 &"
)

#: Stop the workload and wait for it; print what went wrong in it.
STOP = ("touch /tmp/stop; i=0; while [ ! -e /tmp/wl.end ] && [ $i -lt 1200 ]; do usleep 100000; i=$((i + 1)); "
        "done; [ -e /tmp/wl.end ] && echo stopped; cat /tmp/wl.log")

#: Each acknowledged region's last pass, read back (O_DIRECT): "region r p lost corrupt".
VERIFY_WRITES = (
    "awk '{ last[$1] = $2 } END { for (r in last) print r, last[r] }' /tmp/done | while read r p; do "
    f"dd if=/tmp/pat of=/tmp/e bs=262144 skip=$(( (r + p) % {WINDOWS} )) count=4 2>/dev/null; "
    f"dd if=/dev/vda of=/tmp/g bs=1048576 skip=$(({READ_MIB} + r)) count=1 iflag=direct 2>/dev/null "
    "|| echo RFAIL $r; "
    "cmp -l /tmp/e /tmp/g | awk -v r=$r -v p=$p '{ if ($3 == 0) l++; else c++ } "
    "END { print \"region\", r, p, l+0, c+0 }'; done"
)

#: Every MiB of the read area the reader got, checksummed from the page cache: "chunk c md5".
VERIFY_READS = ("for c in $(cat /tmp/rdone); do "
                "echo chunk $c $(dd if=/dev/vda bs=1048576 skip=$c count=1 2>/dev/null | md5sum); done")

#: Sectors read from the disk so far (/sys/block/vda/stat field 3).
SECTORS_READ = "awk '{ print $3 }' /sys/block/vda/stat"


def _count(guest: Guest, path: str) -> int:
    return int(guest.check(f"wc -l < {path}"))


def _migrate_working_guest(tmp_path: Path, cleanup: list[object], disk: str, ring: str,  # noqa: F811
                           *, skip_log: bool = False) -> dict[str, object]:
    """Boot a guest on `disk` ("pyvirtio" or "builtin"), start the workload,
    migrate it to a second QEMU while it runs, verify on the destination.
    Returns the numbers and what was found wrong."""
    t0 = time.monotonic()
    image, md5s = _image(tmp_path)
    packed = ring == "packed"
    bes: list[BackendProcess] = []
    if disk == "pyvirtio":
        for name in ("src", "dst"):
            be = _backend(tmp_path, image, name, skip_log=skip_log and name == "src")
            cleanup.append(be)
            be.start()
            bes.append(be)
        dev_src = vhost_user_blk_args(bes[0].sock, num_queues=1, extra={"packed": packed})
        dev_dst = vhost_user_blk_args(bes[1].sock, num_queues=1, extra={"packed": packed})
    else:
        # page-cache I/O on the host (writeback): both QEMUs see one another's writes
        dev_src = dev_dst = builtin_blk_args(image, packed=packed, cache="writeback")
    src = Guest(device_args=dev_src, qmp=True, append="init_on_alloc=0", log_dir=tmp_path / "src")
    cleanup.append(src)
    with src:
        assert src.check("cat /proc/cmdline").endswith("init_on_alloc=0")
        src.check("dd if=/dev/urandom of=/tmp/pat bs=1M count=7 2>/dev/null")  # 24 x 256 KiB + 768 KiB
        src.check(WORKLOAD.replace("{pause}", str(READ_PAUSE_US)))
        time.sleep(2.0)  # the workload is under way
        before = (_count(src, "/tmp/done"), _count(src, "/tmp/rdone"))
        dst = destination(src, device_args=dev_dst, log_dir=tmp_path / "dst", paused=True)
        cleanup.append(dst)
        with dst:
            mig: MigrationResult = migrate(src, dst, max_bandwidth=MAX_BANDWIDTH, timeout=150)
            diff = ram_diff(src, dst, tmp_path)  # before the destination runs
            dst.qmp().command("cont")
            after = (_count(dst, "/tmp/done"), _count(dst, "/tmp/rdone"))
            src.close()  # paused for good; frees the CPU
            time.sleep(1.0)  # the workload carries on here for a moment
            stopped = dst.check(STOP, timeout=150)
            writes = dst.check(VERIFY_WRITES, timeout=240)
            sectors0 = int(dst.check(SECTORS_READ))
            reads = dst.check(VERIFY_READS, timeout=240)
            sectors1 = int(dst.check(SECTORS_READ))
            dmesg = dst.check("dmesg | grep -i -E 'I/O error|blk_update_request|is not a head|virtio.*error' "
                              "|| true")
            md5_pat = [line.split()[0] for line in dst.check(
                f"i=0; while [ $i -lt {WINDOWS} ]; do dd if=/tmp/pat bs=262144 skip=$i count=4 2>/dev/null "
                "| md5sum; i=$((i + 1)); done").splitlines()]
    stats: dict = {}  # type: ignore[type-arg]
    for be in bes:
        be.stop()
    if bes:
        stats = _exit_stats(bes[0].text())
    # what the guest saw
    bad = [line for line in stopped.splitlines() if re.match(r"[WRV]FAIL|RDFAIL", line)]
    regions = [tuple(map(int, line.split()[1:])) for line in writes.splitlines() if line.startswith("region")]
    lost = sum(r[2] for r in regions)
    corrupt = sum(r[3] for r in regions)
    chunks = [line.split() for line in reads.splitlines() if line.startswith("chunk")]
    stale = [int(c[1]) for c in chunks if c[2] != md5s[int(c[1])]]
    # the bytes on the host: the last acknowledged pass of every region
    host_bad = []
    with open(image, "rb") as f:
        for r, p, _, _ in regions:
            f.seek((READ_MIB + r) * MiB)
            if hashlib.md5(f.read(MiB)).hexdigest() != md5_pat[(r + p) % WINDOWS]:
                host_bad.append(r)
    dirty_log = stats.get("dirty_log", {})
    result = {
        "disk": disk, "ring": ring, "skip_log": skip_log,
        "written_mib": after[0] - before[0], "read_mib": after[1] - before[1],
        "total_ms": mig.total_time_ms, "downtime_ms": mig.downtime_ms, "passes": mig.dirty_sync_count,
        "sent_mib": mig.transferred / MiB, **_ram_verdict(diff, dirty_log),
        "pages_marked": dirty_log.get("pages_marked"), "log_bases": dirty_log.get("bases"),
        "stopped": "stopped" in stopped, "guest_errors": bad, "dmesg": dmesg,
        "regions": len(regions), "lost": lost, "corrupt": corrupt, "host_bad": host_bad,
        "chunks": len(chunks), "stale_chunks": stale,
        "verify_sectors_read": sectors1 - sectors0,
        "seconds": time.monotonic() - t0,
    }
    damaged = bool(stale or corrupt or lost or host_bad or bad or dmesg)
    label = f"{disk}{' (dirty log off)' if skip_log else ''}"
    pm = "-" if result["pages_marked"] is None else result["pages_marked"]
    print(f"\nmigration {label:26} {ring:6}: during migration wrote {result['written_mib']} MiB, read "
          f"{result['read_mib']} MiB; migration {mig.total_time_ms} ms, downtime {mig.downtime_ms} ms, "
          f"{mig.dirty_sync_count} passes, {result['sent_mib']:.0f} MiB sent; pages_marked {pm}; "
          f"RAM pages differing {len(diff)}{_blame(result)}; "
          f"stale page-cache MiB {len(stale)}/{len(chunks)}, regions {len(regions)} lost {lost} B corrupt "
          f"{corrupt} B host mismatches {len(host_bad)}, guest errors {len(bad)}; "
          f"result {'CORRUPT' if damaged else 'intact'}; test {result['seconds']:.0f} s")
    return result


def _ram_verdict(diff: list[int], dirty_log: dict) -> dict[str, object]:  # type: ignore[type-arg]
    """The differing pages (guest addresses), split into those the source
    back-end wrote (its `written_ranges`) and the others."""
    runs = dirty_log.get("written_ranges") or []
    written = {page for first, last in runs for page in range(first, last + 1)}
    mine = [a for a in diff if a >> 12 in written]
    others = [a for a in diff if a >> 12 not in written]
    return {"ram_diff_pages": len(diff), "ram_diff_backend": [hex(a) for a in mine[:8]],
            "ram_diff_backend_pages": len(mine), "ram_diff_other": [hex(a) for a in others[:8]],
            "ram_diff_other_pages": len(others), "traced": bool(runs)}


def _blame(v: dict) -> str:  # type: ignore[type-arg]
    return f" ({v['ram_diff_backend_pages']} written by the back-end)" if v["traced"] else ""


def _assert_ram_moved(r: dict, *, backend: bool) -> None:  # type: ignore[type-arg]
    if backend:
        assert r["traced"], "the source back-end listed no page it wrote (PYVIRTIO_TEST_DIRTY_TRACE)"
        assert r["ram_diff_backend_pages"] == 0, \
            f"pages the back-end wrote differ on the destination (logged too late or not at all): " \
            f"{r['ram_diff_backend_pages']}, {r['ram_diff_backend']}"
    assert r["ram_diff_other_pages"] <= RAM_LOSS_TOLERATED, \
        f"the destination's RAM differs from the source's: {r['ram_diff_other_pages']} pages, {r['ram_diff_other']}"


def _assert_workload_spanned(r: dict) -> None:  # type: ignore[type-arg]
    assert r["stopped"], "the workload did not stop on the destination"
    assert r["written_mib"] > 0 and r["read_mib"] > 0, "the guest did not work during the migration"
    assert r["chunks"] >= r["read_mib"] and r["regions"] >= 3
    # the verification read the page cache, not the disk (a re-read would hide stale pages)
    assert r["verify_sectors_read"] < r["chunks"] * MiB // 512 // 20, r["verify_sectors_read"]


def _assert_intact(r: dict) -> None:  # type: ignore[type-arg]
    _assert_workload_spanned(r)
    assert r["guest_errors"] == [] and r["dmesg"] == "", (r["guest_errors"], r["dmesg"])
    assert r["lost"] == 0 and r["corrupt"] == 0 and r["host_bad"] == []
    assert r["stale_chunks"] == [], f"stale page-cache MiB on the destination: {r['stale_chunks']}"
    _assert_ram_moved(r, backend=r["disk"] == "pyvirtio")


def _qemu_lost_pages(r: dict) -> bool:  # type: ignore[type-arg]
    """The RAM comparison found pages the vCPUs wrote differing on the
    destination (QEMU's own loss under TCG, within the tolerated few) and
    not one page the back-end wrote: damage the guest saw may come from that."""
    return 0 < r["ram_diff_other_pages"] <= RAM_LOSS_TOLERATED and r["ram_diff_backend_pages"] == 0


def _checked(run: Callable[[Path], dict], check: Callable[[dict], None],  # type: ignore[type-arg]
             tmp_path: Path) -> dict:  # type: ignore[type-arg]
    """`check(run(dir))`; when it fails and QEMU lost a vCPU-written page in
    that migration, the whole migration runs once more and that run decides.
    A lost vCPU page can land anywhere in the guest (a buffer dd is about to
    write, a tmpfs file it compares), so the guest's own checks can trip on
    it with QEMU's built-in devices too (seen: 1 run in ~25, "VFAIL" with one
    page differing). A fault of the back-end shows again on the second run,
    or as a page it wrote (never retried)."""
    (tmp_path / "1").mkdir()
    r = run(tmp_path / "1")
    try:
        check(r)
    except AssertionError as e:
        if not _qemu_lost_pages(r):
            raise
        print(f"\nonce more: {str(e).splitlines()[0]}; the RAM comparison found {r['ram_diff_other_pages']} "
              f"page(s) only the vCPUs wrote differing ({', '.join(r['ram_diff_other'])}), none the back-end wrote")
        (tmp_path / "2").mkdir()
        r = run(tmp_path / "2")
        check(r)
    return r


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_migration_with_pyvirtio_blk_keeps_every_write_and_page_cache_intact(
        tmp_path: Path, cleanup: list[object], ring: str) -> None:  # noqa: F811
    r = _checked(lambda d: _migrate_working_guest(d, cleanup, "pyvirtio", ring), _assert_intact, tmp_path)
    assert r["pages_marked"] is not None and r["pages_marked"] > 0, "the source back-end marked no page"
    assert r["log_bases"] is not None and r["log_bases"] >= 1


def test_migration_baseline_with_qemu_builtin_virtio_blk(tmp_path: Path, cleanup: list[object]) -> None:  # noqa: F811
    _checked(lambda d: _migrate_working_guest(d, cleanup, "builtin", "split"), _assert_intact, tmp_path)


def test_migration_without_dirty_logging_is_caught(tmp_path: Path, cleanup: list[object]) -> None:  # noqa: F811
    """Non-vacuity: the source back-end offers and accepts logging but marks
    nothing; the same test must find stale data on the destination."""
    r = _migrate_working_guest(tmp_path, cleanup, "pyvirtio", "split", skip_log=True)
    _assert_workload_spanned(r)
    assert r["pages_marked"] == 0, "the test-only switch did not switch the logging off"
    assert r["stale_chunks"], "an unlogged migration went unnoticed: the test cannot see missing dirty logging"
    assert r["ram_diff_backend_pages"] > RAM_LOSS_TOLERATED, "the RAM comparison did not blame the back-end"


# --- net -------------------------------------------------------------------------------------------

#: Host side of the stream: connect to the guest, send random 64 KiB blocks at
#: about RATE bytes/s until STOPFILE exists, then close and print bytes and md5.
SENDER = r"""
import hashlib, json, os, socket, sys, time
host, port, rate, stopfile = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
s.settimeout(120)
md5, sent, t0 = hashlib.md5(), 0, time.monotonic()
while not os.path.exists(stopfile):
    block = os.urandom(65536)
    s.sendall(block)
    md5.update(block)
    sent += len(block)
    ahead = sent / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
    elif ahead < -0.5:  # stalled (the migration's switch-over): no catching up in a burst
        t0 += -ahead - 0.5
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
print(json.dumps({"bytes": sent, "md5": md5.hexdigest(), "seconds": time.monotonic() - t0}), flush=True)
"""
STREAM_RATE = 3 * MiB
RX_BYTES = "cat /sys/class/net/eth0/statistics/rx_bytes"
STREAM_PORT = 5001


def _bridge(ns: NetNamespace, tap2: str, bridge: str = "pvbr0") -> None:
    """A second TAP in `ns`, both TAPs in one bridge that holds the host address.
    The bridge learns where the guest's MAC is: after the migration the host's
    frames reach the destination only once something announces the move (a
    RARP that QEMU or the back-end sends for the guest, VHOST_USER_SEND_RARP),
    or the guest itself sends; a host-to-guest stream whose sender gets no
    answer stalls otherwise."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns.name, *args], check=True, capture_output=True, timeout=30)
    ip("tuntap", "add", "dev", tap2, "mode", "tap")
    ip("link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    ip("addr", "del", ns.host_cidr, "dev", ns.tap)
    for tap in (ns.tap, tap2):
        ip("link", "set", tap, "master", bridge)
        ip("link", "set", tap, "up")
    ip("addr", "add", ns.host_cidr, "dev", bridge)
    ip("link", "set", bridge, "up")


def _migrate_streaming_guest(tmp_path: Path, nic: str, ring: str, *, skip_log: bool = False) -> dict[str, object]:
    """Boot a guest with `nic` ("pyvirtio" or "builtin") on a TAP bridged with a
    second TAP for the destination; stream random data from the host into the
    guest's tmpfs across the migration; the stream ends on the destination
    and the guest's md5 of it matches what was sent."""
    reason = missing_requirements("ip", why_root="network namespaces, TAP devices")
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    stopfile = tmp_path / "stop-sender"
    pids: list[int] = []
    packed = ring == "packed"
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(NetNamespace())
        _bridge(ns, "pvtap1")
        bes: list[PyvirtioNetBackend] = []
        devs = []
        for name, tap in (("src", ns.tap), ("dst", "pvtap1")):
            if nic == "pyvirtio":
                env = {DIRTY_TRACE: "1", **({SKIP_DIRTY_LOG: "1"} if skip_log and name == "src" else {})}
                be = stack.enter_context(PyvirtioNetBackend(ns, port=f"tap:{tap}", log_dir=tmp_path / name, env=env))
                pids.append(be.pid)  # type: ignore[arg-type]
                bes.append(be)
                devs.append(vhost_user_net_args(be.socket_path, packed=packed))
            else:
                devs.append(builtin_net_args(tap, packed=packed))
        src = Guest(device_args=devs[0], ip=ns.guest_cidr, netns=ns.name, qmp=True, append="init_on_alloc=0",
                    log_dir=tmp_path / "src")
        stack.callback(src.close)  # closed before the back-ends and the namespace
        src.start()
        pids.append(src.pid)  # type: ignore[arg-type]
        src.wait_booted()
        # checksummed as it arrives (kept in tmpfs, a long stream would fill the guest's RAM)
        src.check(f"(nc -l -p {STREAM_PORT} 2>/tmp/nc.err | md5sum > /tmp/rx.md5; echo end > /tmp/nc.end) "
                  "> /dev/null 2>&1 &")
        sender = ns.popen([sys.executable, "-c", SENDER, ns.guest_ip, str(STREAM_PORT), str(STREAM_RATE),
                           str(stopfile)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pids.append(sender.pid)
        time.sleep(3.0)  # the stream is flowing
        before = int(src.check(RX_BYTES))
        assert before > MiB, "no data reached the guest before the migration"
        dst = destination(src, device_args=devs[1], log_dir=tmp_path / "dst", paused=True)
        stack.callback(dst.close)
        dst.start()
        pids.append(dst.pid)  # type: ignore[arg-type]
        mig = migrate(src, dst, max_bandwidth=MAX_BANDWIDTH, timeout=150)
        diff = ram_diff(src, dst, tmp_path)  # before the destination runs
        dst.qmp().command("cont")
        at_switch = int(dst.check(RX_BYTES))
        src.close()
        time.sleep(4.0)  # the stream carries on through the destination's NIC
        after = int(dst.check(RX_BYTES))
        stopfile.touch()
        out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
        sent = json.loads(out)
        end = dst.check("i=0; while [ ! -e /tmp/nc.end ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); "
                        "done; cat /tmp/nc.end /tmp/rx.md5 /tmp/nc.err", timeout=60).split()
        rx_errors = int(dst.check("cat /sys/class/net/eth0/statistics/rx_errors"))
        stats_src = (bes[0].stop() or {}) if bes else {}
    pm = stats_src.get("dirty_log", {}).get("pages_marked")
    verdict = _ram_verdict(diff, stats_src.get("dirty_log", {}))
    intact = end[:2] == ["end", sent["md5"]]
    label = f"{nic}{' (dirty log off)' if skip_log else ''}"
    print(f"\nmigration {label:26} net {ring:6}: during migration received {(at_switch - before) / MiB:.1f} MiB, "
          f"after it {(after - at_switch) / MiB:.1f} MiB; migration {mig.total_time_ms} ms, downtime "
          f"{mig.downtime_ms} ms, {mig.dirty_sync_count} passes; pages_marked {'-' if pm is None else pm}; "
          f"RAM pages differing {len(diff)}{_blame(verdict)}; "
          f"stream {sent['bytes'] / MiB:.1f} MiB sent in {sent['seconds']:.0f} s; "
          f"result {'intact' if intact else 'CORRUPT'}; test {time.monotonic() - t0:.0f} s")
    for pid in pids:
        assert not pid_alive(pid), f"pid {pid} still running"
    assert not netns_exists(ns.name)
    return {"end": end, "sent": sent, "intact": intact, "rx_errors": rx_errors, "pages_marked": pm,
            "before": before, "at_switch": at_switch, "after": after, "nic": nic,
            **verdict}


def _assert_stream_intact(r: dict) -> None:  # type: ignore[type-arg]
    assert r["end"][0] == "end", f"the stream did not end in the guest: {r['end']}"
    assert r["rx_errors"] == 0
    assert r["at_switch"] > r["before"] and r["after"] > r["at_switch"], \
        "the stream did not flow during and after the migration"
    assert r["intact"], (r["end"], r["sent"])
    _assert_ram_moved(r, backend=r["nic"] == "pyvirtio")


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_migration_with_pyvirtio_net_keeps_a_tcp_stream_intact(tmp_path: Path, ring: str) -> None:
    r = _checked(lambda d: _migrate_streaming_guest(d, "pyvirtio", ring), _assert_stream_intact, tmp_path)
    assert r["pages_marked"] is not None and r["pages_marked"] > 0, "the source back-end marked no page"


def test_migration_net_baseline_with_qemu_builtin_virtio_net(tmp_path: Path) -> None:
    _checked(lambda d: _migrate_streaming_guest(d, "builtin", "split"), _assert_stream_intact, tmp_path)


def test_migration_net_without_dirty_logging_is_caught(tmp_path: Path) -> None:
    """Non-vacuity: the source back-end marks nothing. Frames it wrote into
    guest buffers after QEMU copied those pages are stale on the destination:
    the RAM comparison finds them every time; the stream's checksum differs
    too when such a buffer still held unread data at the switch-over (9 of 11
    runs on a 2-core TCG host; in the other two the stream stalled on the
    destination instead), so it is printed, not asserted."""
    r = _migrate_streaming_guest(tmp_path, "pyvirtio", "split", skip_log=True)
    assert r["end"][0] == "end" and r["at_switch"] > r["before"]
    assert r["pages_marked"] == 0, "the test-only switch did not switch the logging off"
    assert r["ram_diff_backend_pages"] > RAM_LOSS_TOLERATED, \
        "an unlogged migration went unnoticed: the test cannot see missing dirty logging"
