"""virtio-fs over vhost-user with a real guest: Linux 6.1's virtiofs driver
under QEMU 7.2 (TCG, `vhost-user-fs-pci`, `vectors=0`) mounts a host
directory served by `pyvirtio fs` and uses it as a file system; the host
then checks every file the guest made, its content and its metadata.

Deselected by default (root, QEMU, a kernel); run with

    .venv/bin/pytest -m guest tests/test_guest_fs.py -s
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_support import missing_requirements, pid_alive
from pyvirtio.bench.harness import DEFAULT_MODULES, Guest, build_initramfs, vhost_user_fs_args
from test_guest_blk import BackendProcess, _exit_stats

pytestmark = pytest.mark.guest

FS_MODULES = (*DEFAULT_MODULES, "fuse", "virtiofs")
MiB = 1 << 20
SMALL = 300
BIGDIR = 2000


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[list[object]]:
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


def _fs_backend(tmp_path: Path, shared: Path, *extra: str) -> BackendProcess:
    sock = tmp_path / "fs.sock"
    argv = [sys.executable, "-m", "pyvirtio", "-v", "fs", "--socket-path", str(sock), "--shared-dir", str(shared),
            *extra]
    return BackendProcess(argv, sock, tmp_path, name="fs")


WORKLOAD = [
    "mkdir -p /mnt && mount -t virtiofs share /mnt",
    "grep -c ' /mnt virtiofs ' /proc/mounts",
    # many small files, each with its own content
    f"mkdir /mnt/small && for i in $(seq 0 {SMALL - 1}); do echo \"small file $i\" > /mnt/small/f$i; done",
    # a large directory
    f"mkdir /mnt/bigdir && cd /mnt/bigdir && for i in $(seq 0 {BIGDIR - 1}); do : > e$i; done && ls | wc -l",
    # one large file: written, synced, read back uncached
    "dd if=/dev/urandom of=/tmp/large bs=1M count=32 2>/dev/null && md5sum /tmp/large",
    ("dd if=/tmp/large of=/mnt/large bs=1M conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches "
     "&& md5sum /mnt/large"),
    # rename, unlink, mkdir -p, rmdir
    "mv /mnt/small/f1 /mnt/small/renamed && rm /mnt/small/f2 && mkdir -p /mnt/a/b/c && rmdir /mnt/a/b/c",
    "mv /mnt/a /mnt/a2 && ls /mnt/a2",
    # symlinks (relative and absolute: the guest resolves them), a hard link
    "ln -s f3 /mnt/small/rel && ln -s /proc/version /mnt/small/abs && cat /mnt/small/rel && head -c 5 /mnt/small/abs",
    "ln /mnt/small/f4 /mnt/small/hard && stat -c %h /mnt/small/f4",
    # truncate, chmod, timestamps
    "truncate -s 100000 /mnt/small/f5 && truncate -s 3 /mnt/small/f6 && stat -c %s /mnt/small/f5",
    "chmod 640 /mnt/small/f7 && touch -d '2001-02-03 04:05:06' /mnt/small/f8 && stat -c %a /mnt/small/f7",
    # write in the middle, append, fsync through dd
    ("printf XYZ | dd of=/mnt/small/f9 bs=1 seek=2 conv=notrunc,fsync 2>/dev/null && echo tail >> /mnt/small/f9 "
     "&& cat /mnt/small/f9"),
    # everything still right after a remount (nothing cached)
    ("cd / && umount /mnt && mount -t virtiofs share /mnt && ls /mnt/bigdir | wc -l && ls /mnt/small | wc -l "
     "&& md5sum /mnt/large"),
    "rm -f /mnt/bigdir/e0 /mnt/bigdir/e1 && ls /mnt/bigdir | wc -l && df -k /mnt | tail -1",
    # a program run from the share (its file is mapped privately: works with direct I/O too)
    "cp /bin/busybox /mnt/busybox && /mnt/busybox echo exec-ok",
    "sync && umount /mnt",
]


def test_guest_uses_the_shared_directory_as_a_file_system(tmp_path: Path, cleanup: list[object]) -> None:
    t0 = time.monotonic()
    shared = tmp_path / "shared"
    shared.mkdir()
    be = _fs_backend(tmp_path, shared)
    cleanup.append(be)
    be.start()
    guest = Guest(device_args=vhost_user_fs_args(be.sock, tag="share", queue_size=128),
                  initrd=build_initramfs(modules=FS_MODULES), log_dir=tmp_path)
    cleanup.append(guest)
    outs = []
    with guest:
        for cmd in WORKLOAD:
            outs.append(guest.check(cmd, timeout=300))
        dmesg = guest.check("dmesg | grep -i -E 'virtiofs|fuse' | grep -i -E 'error|fail|bug' || true")
    be.stop()
    print(f"\nguest outputs: {outs}\ntest time: {time.monotonic() - t0:.1f} s")
    assert outs[1] == "1"
    assert outs[3] == str(BIGDIR)
    large_md5 = outs[4].split()[0]
    assert outs[5].split()[0] == large_md5
    assert outs[7] == "b"
    assert outs[8] == "small file 3\nLinux"
    assert outs[9] == "2"
    assert outs[10] == "100000" and outs[11] == "640"
    assert outs[12] == "smXYZ file 9\ntail"
    assert outs[13].split("\n")[:2] == [str(BIGDIR), str(SMALL + 3 - 1)]
    assert outs[13].split("\n")[2].split()[0] == large_md5
    assert outs[14].split("\n")[0] == str(BIGDIR - 2)
    assert outs[15] == "exec-ok"
    assert dmesg == ""

    # the host's view of every file
    small = shared / "small"
    for i in range(SMALL):
        p = small / f"f{i}"
        if i in (1, 2):
            assert not p.exists()
            continue
        want = f"small file {i}\n".encode()
        if i == 5:
            want = want + bytes(100000 - len(want))
        elif i == 6:
            want = want[:3]
        elif i == 9:
            want = b"smXYZ file 9\ntail\n"
        assert p.read_bytes() == want, p
        assert stat.S_ISREG(p.lstat().st_mode)
    assert (small / "renamed").read_bytes() == b"small file 1\n"
    assert os.readlink(small / "rel") == "f3" and os.readlink(small / "abs") == "/proc/version"
    assert (small / "hard").stat().st_ino == (small / "f4").stat().st_ino and (small / "f4").stat().st_nlink == 2
    assert stat.S_IMODE((small / "f7").stat().st_mode) == 0o640
    assert time.gmtime((small / "f8").stat().st_mtime)[:6] == (2001, 2, 3, 4, 5, 6) or \
        time.localtime((small / "f8").stat().st_mtime)[:6] == (2001, 2, 3, 4, 5, 6)
    names = sorted(os.listdir(shared / "bigdir"))
    assert names == sorted(f"e{i}" for i in range(2, BIGDIR))
    assert all((shared / "bigdir" / n).stat().st_size == 0 for n in names[:50])
    assert (shared / "large").stat().st_size == 32 * MiB
    assert hashlib.md5((shared / "large").read_bytes()).hexdigest() == large_md5
    assert sorted(os.listdir(shared / "a2")) == ["b"] and not (shared / "a").exists()
    stats = _exit_stats(be.text())
    print(f"back-end counters: {stats.get('fs')}")
    assert stats["fs"]["requests"] > SMALL + BIGDIR


def test_guest_cannot_leave_the_shared_directory(tmp_path: Path, cleanup: list[object]) -> None:
    """From inside the guest: '..' of the mount root, an absolute symlink, a
    symlink planted by the host to an outside directory, a device node and a
    hard link attempt all stay inside (or fail)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    os.symlink(str(outside), shared / "planted")
    be = _fs_backend(tmp_path, shared)
    cleanup.append(be)
    be.start()
    guest = Guest(device_args=vhost_user_fs_args(be.sock, tag="share"),
                  initrd=build_initramfs(modules=FS_MODULES), log_dir=tmp_path)
    cleanup.append(guest)
    with guest:
        guest.check("mkdir -p /mnt && mount -t virtiofs share /mnt && echo guest-only > /tmp/gsecret")
        # '..' of the root is the guest's own '/', never the host's parent directory
        assert "secret" not in guest.check("ls /mnt/.. /mnt/../..")
        # the planted symlink resolves in the guest's namespace: the host's outside dir is not there
        rc, out = guest.run("cat /mnt/planted/secret")
        assert rc != 0 and "host secret" not in out
        # a symlink the guest makes to its own /tmp reads the guest's file
        guest.check("ln -s /tmp/gsecret /mnt/abs")
        assert guest.check("cat /mnt/abs") == "guest-only"
        # no device nodes on the host
        rc, _ = guest.run("mknod /mnt/null c 1 3")
        assert rc != 0
        guest.check("umount /mnt")
    be.stop()
    assert (outside / "secret").read_text() == "host secret\n"
    assert sorted(os.listdir(outside)) == ["secret"]
    assert os.readlink(shared / "abs") == "/tmp/gsecret"
    assert not os.path.lexists(shared / "null")


def test_fs_bench_measures_ours_and_9p_in_one_run(tmp_path: Path) -> None:
    """A small `pyvirtio bench guest-fs`: our default back-end and QEMU's
    virtio-9p with the same data caching (cache=loose) serve the same guest
    workload; the table has every rate, our back-end's time per MiB and the
    ratios to that 9p; nothing is left behind."""
    from pyvirtio.bench.guest_fs import BASELINE, FsBenchConfig, format_table, run

    assert BASELINE["pyvirtio-fs"] == "9p-loose" and BASELINE["pyvirtio-fs-metadata"] == "9p"
    cfg = FsBenchConfig(targets=("pyvirtio-fs", "9p-loose"), file_mib=8, small_files=100, work_dir=tmp_path)
    res = run(cfg)
    table = format_table(res)
    print("\n" + table)
    assert [r["target"] for r in res] == ["pyvirtio-fs", "9p-loose"]
    for r in res:
        assert r["write_MBps"] > 0.5 and r["read_MBps"] > 0.5
        assert r["create_per_s"] > 5 and r["stat_per_s"] > 5 and r["delete_per_s"] > 5
    ours, base = res
    # our back-end's own time per MiB: more than nothing, less than the guest's whole wall time per MiB
    for op, rate in (("write", "write_MBps"), ("read", "read_MBps")):
        assert 0 < ours[f"backend_{op}_us_per_MiB"] < 1.05 * MiB_us / ours[rate]
    assert "backend_read_us_per_MiB" not in base
    row = table.splitlines()[2]
    ratios = "/".join(f"{ours[k] / base[k]:.2f}" for k in ("write_MBps", "read_MBps", "create_per_s",
                                                             "stat_per_s", "delete_per_s"))
    assert row.startswith("pyvirtio-fs ") and row.endswith(f"9p-loose  {ratios}")
    assert list(tmp_path.iterdir()) == []


#: microseconds per MiB at 1 MB/s
MiB_us = float(1 << 20)
