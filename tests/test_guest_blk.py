"""virtio-blk over vhost-user with a real guest: Linux 6.1's virtio_blk
driver under QEMU 7.2 (TCG, `vhost-user-blk-pci`, `vectors=0`).

- our back-end as a filesystem disk (mkfs, mount, fstrim -> DISCARD, GET_ID);
- the crash promise: while the guest writes a known pattern continuously
  (`dd oflag=direct conv=fsync`, `sync`), the back-end is `kill -9`ed at
  random moments and restarted; QEMU reconnects (`reconnect=1`), hands back
  the inflight buffer, the back-end resubmits what was in flight. Every
  region is read back right after it is written and again at the end, in
  the guest, and its bytes on the host image: 0 lost, 0 corrupt, no guest
  I/O error. Split and packed rings.
- the RAM disk of `examples/ramdisk_blk.py` (public API only), formatted and
  mounted by the guest.
- online resize: the image grows under the running guest, the operator
  tells the back-end through its control socket (`pyvirtio blk-ctl`), the
  back-end sends CONFIG_CHANGE_MSG on the back-end channel, QEMU re-reads the
  config and the guest sees the new capacity without a restart and writes
  and reads past the old end; a resize while the driver is unbound reaches
  it when it binds again.

Deselected by default (root, QEMU, a kernel); run with

    .venv/bin/pytest -m guest tests/test_guest_blk.py -s
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.harness import DEFAULT_MODULES, Guest, build_initramfs, vhost_user_blk_args

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
#: ext2 through the ext4 driver (the kernel has no ext2 module), which needs crc32c
FS_MODULES = (*DEFAULT_MODULES, "crc32c_generic", "ext4")


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)


class BackendProcess:
    """A vhost-user back-end as a child process, restarted at will; every
    incarnation is stopped by its pid and logs to its own file."""

    def __init__(self, argv: list[str], sock: Path, log_dir: Path, name: str = "backend") -> None:
        self.argv = argv
        self.sock = sock
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.pids: list[int] = []

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_dir / f"{self.name}.{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        self.pids.append(self.proc.pid)
        deadline = time.monotonic() + timeout
        while not self.sock.exists():  # bound and listening a moment later; QEMU retries
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not create {self.sock}")
            time.sleep(0.02)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def wait_ring_started(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "started (" in self.log.read_text(errors="replace"):
                return True
            time.sleep(0.02)
        return False

    def text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[list[object]]:
    """Stops every back-end and checks nothing is left: processes, sockets."""
    things: list[object] = []
    yield things
    for t in things:
        if isinstance(t, BackendProcess):
            t.stop()
    for t in things:
        if isinstance(t, BackendProcess):
            for pid in t.pids:
                assert not pid_alive(pid), f"back-end pid {pid} still running"
            t.sock.unlink(missing_ok=True)
        elif isinstance(t, Guest):
            assert t.pid is not None and not pid_alive(t.pid), "qemu still running"
    for img in tmp_path.glob("*.img"):
        img.unlink()


def _blk_backend(tmp_path: Path, image: Path, *extra: str) -> BackendProcess:
    sock = tmp_path / "blk.sock"
    argv = [sys.executable, "-m", "pyvirtio", "-v", "blk", "--socket-path", str(sock), "--blk-file", str(image),
            "--queues", "2", *extra]
    return BackendProcess(argv, sock, tmp_path)


def _image(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _exit_stats(text: str) -> dict:  # type: ignore[type-arg]
    for line in reversed(text.splitlines()):
        if line.startswith('{"event":"exit"'):
            return json.loads(line)  # type: ignore[no-any-return]
    return {}


# --- a filesystem disk ------------------------------------------------------------------------


def test_guest_runs_a_filesystem_with_discard_on_pyvirtio_blk(tmp_path: Path, cleanup: list[object]) -> None:
    t0 = time.monotonic()
    image = _image(tmp_path, 64 * MiB)
    be = _blk_backend(tmp_path, image, "--serial", "pyvirtio-test-disk")
    cleanup.append(be)
    be.start()
    # two vCPUs: QEMU asks two request queues (MQ, GET_QUEUE_NUM), the guest uses both
    guest = Guest(device_args=vhost_user_blk_args(be.sock, num_queues=2), smp=2,
                  initrd=build_initramfs(modules=FS_MODULES), log_dir=tmp_path)
    cleanup.append(guest)
    with guest:
        assert guest.check("ls /sys/block/vda/mq | wc -l") == "2"
        assert guest.check("cat /sys/block/vda/size") == str(64 * MiB // 512)
        assert guest.check("cat /sys/block/vda/serial") == "pyvirtio-test-disk"
        assert int(guest.check("cat /sys/block/vda/queue/discard_max_bytes")) > 0
        assert guest.check("cat /sys/block/vda/queue/write_cache") == "write back"
        guest.check("mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext2 /dev/vda /mnt", timeout=60)
        guest.check("dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null && sync", timeout=60)
        want = guest.check("md5sum /mnt/big").split()[0]
        guest.check("rm /mnt/big && sync && fstrim -v /mnt", timeout=60)  # DISCARD the freed blocks
        guest.check("dd if=/dev/urandom of=/mnt/f bs=1M count=4 2>/dev/null && sync", timeout=60)
        want = guest.check("md5sum /mnt/f").split()[0]
        guest.check("umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt")
        assert guest.check("md5sum /mnt/f").split()[0] == want
        guest.check("umount /mnt")
        assert guest.check("dmesg | grep -c -i -E 'I/O error|blk_update_request' || true") == "0"
    be.stop()
    stats = _exit_stats(be.text())
    counts = stats["requests"]
    print(f"\nrequests: {counts}\ntest time: {time.monotonic() - t0:.1f} s")
    assert counts["discards"] > 0 and counts["flushes"] > 0 and counts["ioerr"] == 0
    assert sorted(q["role"] for q in stats["queues"] if q["packets"]) == ["req0", "req1"]


# --- kill -9 under load --------------------------------------------------------------------------

REGION = MiB
NREGIONS = 96
WINDOWS = 24  # region r holds pattern bytes [ (r % 24) * 256 KiB, + 1 MiB )


def _writer_script(end: int) -> str:
    """Two writers, even and odd regions, 64 KiB and 16 KiB direct writes each
    followed by fsync, `sync` and an immediate direct read-back, until guest
    uptime `end` or the disk is full. Region numbers done go to /tmp/done."""
    w = ("wr() { r=$1; bs=$2; n=$((1048576 / bs)); "
         f"while [ $(cut -d. -f1 /proc/uptime) -lt {end} ] && [ $r -lt {NREGIONS} ]; do "
         f"s=$(( (r % {WINDOWS}) * 262144 / bs )); "
         "dd if=/tmp/pat of=/dev/vda bs=$bs skip=$s seek=$((r * n)) count=$n oflag=direct conv=fsync "
         "2>/tmp/err$1 || { echo WFAIL $r; cat /tmp/err$1; }; sync; "
         "dd if=/tmp/pat of=/tmp/e$1 bs=$bs skip=$s count=$n 2>/dev/null; "
         "dd if=/dev/vda of=/tmp/g$1 bs=$bs skip=$((r * n)) count=$n iflag=direct 2>/tmp/err$1 "
         "|| { echo RFAIL $r; cat /tmp/err$1; }; "
         "cmp -s /tmp/e$1 /tmp/g$1 || echo VFAIL $r; echo $r >> /tmp/done; r=$((r + 2)); done; }; "
         "rm -f /tmp/done; wr 0 65536 & wr 1 16384 & wait; echo writers-done")
    return w


VERIFY = ("for r in $(sort -n /tmp/done); do "
          f"dd if=/tmp/pat of=/tmp/e bs=262144 skip=$(( r % {WINDOWS} )) count=4 2>/dev/null; "
          "dd if=/dev/vda of=/tmp/g bs=1048576 skip=$r count=1 iflag=direct 2>/dev/null || echo RFAIL $r; "
          "cmp -l /tmp/e /tmp/g | awk -v r=$r '{ if ($3 == 0) l++; else c++ } END { print \"region\", r, l+0, c+0 }'; "
          "done")


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_backend_killed_repeatedly_during_guest_writes_loses_nothing(tmp_path: Path, cleanup: list[object],
                                                                     ring: str) -> None:
    t0 = time.monotonic()
    image = _image(tmp_path, NREGIONS * REGION)
    # a few ms of injected latency keep requests in flight, so the kills land on them
    be = _blk_backend(tmp_path, image, "--inject-latency-ms", "4", "--io-threads", "2")
    cleanup.append(be)
    be.start()
    extra = {"packed": True} if ring == "packed" else {}
    guest = Guest(device_args=vhost_user_blk_args(be.sock, reconnect=1, num_queues=1, extra=extra),
                  log_dir=tmp_path)
    cleanup.append(guest)
    kills: list[float] = []
    problems: list[str] = []
    stop = threading.Event()
    rng = random.Random()

    def killer() -> None:
        while not stop.is_set():
            if not be.wait_ring_started(30):
                problems.append(f"QEMU did not restart the ring after kill {len(kills)}")
                return
            if stop.wait(rng.uniform(0.3, 1.6)):
                return
            be.kill9()
            kills.append(time.monotonic())
            be.start()

    with guest:
        guest.check("dd if=/dev/urandom of=/tmp/pat bs=1M count=7 2>/dev/null")  # 24 x 256 KiB + 768 KiB
        end = int(float(guest.check("cut -d' ' -f1 /proc/uptime"))) + 20
        t = threading.Thread(target=killer, name="killer", daemon=True)
        t.start()
        try:
            rc, out = guest.run(_writer_script(end), timeout=240)
        finally:
            stop.set()
            t.join(60)
        assert not t.is_alive()
        assert be.wait_ring_started(30), "the last back-end never got the ring back"
        assert rc == 0 and "writers-done" in out, out
        bad = [line for line in out.splitlines() if re.match(r"[WRV]FAIL", line)]
        verify = guest.check(VERIFY, timeout=240)
        md5s = guest.check(f"i=0; while [ $i -lt {WINDOWS} ]; do dd if=/tmp/pat bs=262144 skip=$i count=4 "
                           "2>/dev/null | md5sum; i=$((i + 1)); done", timeout=120).split("\n")
        dmesg_errors = guest.check("dmesg | grep -i -E 'I/O error|blk_update_request|virtio_blk.*error' || true")
    regions = [tuple(map(int, line.split()[1:])) for line in verify.splitlines() if line.startswith("region")]
    lost = sum(r[1] for r in regions)
    corrupt = sum(r[2] for r in regions)
    # the bytes on the host, region by region
    host_bad = []
    with open(image, "rb") as f:
        for r, _, _ in regions:
            f.seek(r * REGION)
            if hashlib.md5(f.read(REGION)).hexdigest() != md5s[r % WINDOWS].split()[0]:
                host_bad.append(r)
    be.stop()
    text = be.text()
    resubmitted = sum(int(n) for n in re.findall(r"resubmitting (\d+) request", text))
    print(f"\n{ring}: {len(kills)} kills, {len(regions)} MiB written and verified, {resubmitted} requests "
          f"resubmitted; lost {lost} B, corrupt {corrupt} B, host mismatches {len(host_bad)}, "
          f"guest errors {len(bad)}; test time {time.monotonic() - t0:.1f} s")
    assert not problems, problems
    assert len(kills) >= 4
    assert len(regions) >= 8  # enough written to span the kills (a loaded host writes less in 20 s)
    assert bad == [] and dmesg_errors == ""
    assert lost == 0 and corrupt == 0
    assert host_bad == []
    assert resubmitted >= 1, "no kill caught a request in flight"


# --- online resize -------------------------------------------------------------------------------


def _blk_ctl(ctl: Path, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    p = subprocess.run([sys.executable, "-m", "pyvirtio", "blk-ctl", "--control-socket", str(ctl), *args],
                       capture_output=True, text=True, timeout=60, check=False)
    return p.returncode, json.loads(p.stdout)


def test_guest_sees_an_online_resize_without_a_restart(tmp_path: Path, cleanup: list[object]) -> None:
    t0 = time.monotonic()
    image = _image(tmp_path, 64 * MiB)
    ctl = tmp_path / "ctl.sock"
    be = _blk_backend(tmp_path, image, "--control-socket", str(ctl))
    cleanup.append(be)
    be.start()
    guest = Guest(device_args=vhost_user_blk_args(be.sock, num_queues=1), log_dir=tmp_path)
    cleanup.append(guest)
    with guest:
        assert guest.check("cat /sys/block/vda/size") == str(64 * MiB // 512)
        # the operator grows the image, then tells the back-end
        subprocess.run(["truncate", "-s", "+64M", str(image)], check=True)
        rc, answer = _blk_ctl(ctl, "resize")
        assert rc == 0 and answer["changed"] and answer["capacity"] == 128 * MiB // 512, answer
        assert answer["notified"] == "acked", answer  # QEMU answered CONFIG_CHANGE_MSG
        wait = ("i=0; while [ $(cat /sys/block/vda/size) != {n} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); "
                "done; cat /sys/block/vda/size")
        assert guest.check(wait.format(n=128 * MiB // 512), timeout=60) == str(128 * MiB // 512)
        dmesg = guest.check("dmesg | grep -i -E 'capacity change|new size' || true")
        assert "capacity change from 131072 to 262144" in dmesg, dmesg
        # write and read back past the old end (at 100 MiB), direct I/O
        guest.check("dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null")
        guest.check("dd if=/tmp/p of=/dev/vda bs=1M seek=100 count=4 oflag=direct conv=fsync 2>/dev/null",
                    timeout=60)
        guest.check("dd if=/dev/vda of=/tmp/g bs=1M skip=100 count=4 iflag=direct 2>/dev/null", timeout=60)
        assert guest.check("cmp /tmp/p /tmp/g && echo same") == "same"
        want = guest.check("md5sum /tmp/p").split()[0]
        # the back-end grows the file itself: --size
        rc, answer = _blk_ctl(ctl, "resize", "--size", "192M")
        assert rc == 0 and answer["notified"] == "acked" and answer["capacity"] == 192 * MiB // 512, answer
        assert guest.check(wait.format(n=192 * MiB // 512), timeout=60) == str(192 * MiB // 512)
        guest.check("dd if=/tmp/p of=/dev/vda bs=1M seek=188 count=4 oflag=direct conv=fsync 2>/dev/null",
                    timeout=60)
        # shrinking is refused; the guest keeps its disk
        rc, answer = _blk_ctl(ctl, "resize", "--size", "32M")
        assert rc == 1 and not answer["ok"] and "shrinking" in answer["error"], answer
        assert guest.check("cat /sys/block/vda/size") == str(192 * MiB // 512)
        # a resize while no driver runs the disk (unbound: QEMU stops the rings) is told when it runs again
        dev = guest.check("basename $(readlink /sys/block/vda/device)")
        guest.check(f"echo {dev} > /sys/bus/virtio/drivers/virtio_blk/unbind")
        rc, answer = _blk_ctl(ctl, "resize", "--size", "256M")
        assert rc == 0 and answer["notified"] == "deferred", answer
        guest.check(f"echo {dev} > /sys/bus/virtio/drivers/virtio_blk/bind")
        assert guest.check(wait.format(n=256 * MiB // 512), timeout=60) == str(256 * MiB // 512)
        guest.check("dd if=/dev/vda of=/tmp/g bs=1M skip=188 count=4 iflag=direct 2>/dev/null", timeout=60)
        assert guest.check("cmp /tmp/p /tmp/g && echo same") == "same"
        assert guest.check("dmesg | grep -c -i -E 'I/O error|blk_update_request' || true") == "0"
    assert image.stat().st_size == 256 * MiB
    with open(image, "rb") as f:
        for at in (100, 188):
            f.seek(at * MiB)
            assert hashlib.md5(f.read(4 * MiB)).hexdigest() == want
    be.stop()
    stats = _exit_stats(be.text())
    print(f"\nresizes: {stats['resizes']}, back-end channel: {stats['backend_channel']}\n"
          f"guest: {dmesg.strip()}\ntest time: {time.monotonic() - t0:.1f} s")
    channel = stats["backend_channel"]
    assert (channel["acked"], channel["deferred"], channel["timeouts"]) == (3, 1, 0)


# --- the public API example -----------------------------------------------------------------------


def test_ramdisk_example_is_formatted_and_mounted_by_a_guest(tmp_path: Path, cleanup: list[object]) -> None:
    t0 = time.monotonic()
    sock = tmp_path / "ram.sock"
    be = BackendProcess([sys.executable, str(REPO / "examples" / "ramdisk_blk.py"), "--socket-path", str(sock),
                         "--size-mib", "32"], sock, tmp_path, name="ramdisk")
    cleanup.append(be)
    be.start()
    guest = Guest(device_args=vhost_user_blk_args(sock, num_queues=1, extra={"packed": True}),
                  initrd=build_initramfs(modules=FS_MODULES), log_dir=tmp_path)
    cleanup.append(guest)
    with guest:
        assert guest.check("cat /sys/block/vda/size") == str(32 * MiB // 512)
        guest.check("mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext2 /dev/vda /mnt", timeout=60)
        guest.check("mkdir /mnt/d && dd if=/dev/urandom of=/mnt/d/f bs=1M count=4 2>/dev/null && sync", timeout=60)
        want = guest.check("md5sum /mnt/d/f").split()[0]
        guest.check("umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt")
        assert guest.check("md5sum /mnt/d/f").split()[0] == want
        assert "lost+found" in guest.check("ls /mnt")
        guest.check("umount /mnt")
    print(f"\ntest time: {time.monotonic() - t0:.1f} s")


# --- the benchmark ---------------------------------------------------------------------------------


def test_blk_bench_measures_ours_and_qsd_with_their_host_cpu(tmp_path: Path) -> None:
    """A small `pyvirtio bench guest --device blk`: both back-ends serve the
    same guest workload, the table has their throughput, the ratio to
    qemu-storage-daemon and the CPU each back-end spent; nothing is left
    running."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon not installed (scripts/setup.sh --peers)")
    from pyvirtio.bench.guest_blk import BlkBenchConfig, format_table, run

    cfg = BlkBenchConfig(targets=("pyvirtio-lazy", "pyvirtio-lazy-pure", "qsd"), image_mib=128, write_mib=32, read_mib=128,
                         read_passes=1, read4k_count=500, work_dir=tmp_path)
    res = run(cfg)
    table = format_table(res)
    print("\n" + table)
    assert [r["target"] for r in res] == ["pyvirtio-lazy", "pyvirtio-lazy-pure", "qsd"]
    for r in res:
        assert r["write_MBps"] > 1 and r["read_MBps"] > 1 and r["read4k_iops"] > 10
        assert r["max_segments"] == cfg.queue_size - 2
        assert r["ring"] == "split"  # what the guest's driver negotiated
    ours = res[0]
    # 128 MiB through a Python back-end costs well over one 10 ms clock tick
    assert ours["cpu_us_per_mib_read"] > 0 and ours["cpu_us_per_4k_read"] > 0
    assert "xqsd (w/r/4k)" in table and "1.00/1.00/1.00" in table.splitlines()[3]
    assert list(tmp_path.iterdir()) == []  # the work directory (image, sockets, logs) is gone
