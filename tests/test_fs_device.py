"""virtio-fs device driven by FUSE requests on a driver-model queue
(`pyvirtio.testing.QueuePair`): every operation a Linux guest uses, checked
by the reply and by what happened in the host directory, and the escape
attempts a hostile guest (or a racing host process) can make."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices import fs
from pyvirtio.devices.fs import FsDevice
from pyvirtio.testing import QueuePair

ROOT = fs.FUSE_ROOT_ID


class Fuse:
    """A FUSE client speaking to the device through a virtqueue."""

    def __init__(self, dev: FsDevice) -> None:
        self.dev = dev
        self.pair = QueuePair("split", size=256, mem_size=8 << 20, indirect=True)
        self.unique = 0

    def call(self, opcode: int, nodeid: int = ROOT, args: bytes = b"", out: int = 4096,
             queue: int = 1, uid: int | None = None, segments: list[bytes] | None = None) -> tuple[int, bytes]:
        """Send one request; returns (error, reply body). `segments` splits the
        readable part across several descriptors (as the guest does for WRITE)."""
        self.unique += 2
        req_len = fs.IN_HEADER.size + len(args)
        hdr = fs.IN_HEADER.pack(req_len, opcode, self.unique, nodeid, os.getuid() if uid is None else uid,
                                os.getgid(), os.getpid(), 0, 0)
        pool, mem = self.pair.pool, self.pair.raw
        parts = segments if segments is not None else [hdr + args]
        if segments is not None:
            parts = [hdr, *segments]
        outs = []
        for p in parts:
            gpa = pool.alloc(max(1, len(p)))
            mem.write(gpa, p)
            outs.append((gpa, len(p)))
        ins = []
        if out:
            ins.append((pool.alloc(out), out))
        self.pair.driver.add(outs, ins, token=self.unique)
        self.pair.driver.publish()
        (chain,) = self.pair.vq.pop_batch(1)
        n = self.dev.handle(queue, chain)
        self.pair.vq.complete(chain, n)
        self.pair.vq.flush()
        assert self.pair.driver.get_used() == [(self.unique, n)]
        reply = mem.read(ins[0][0], n) if ins and n else b""
        for gpa, _ in outs + ins:
            pool.free(gpa)
        if not out:
            return 0, b""
        length, error, unique = fs.OUT_HEADER.unpack_from(reply)
        assert unique == self.unique and length == n
        return -error, reply[fs.OUT_HEADER.size:]

    def ok(self, opcode: int, nodeid: int = ROOT, args: bytes = b"", **kw: object) -> bytes:
        err, body = self.call(opcode, nodeid, args, **kw)  # type: ignore[arg-type]
        assert err == 0, f"opcode {opcode}: {os.strerror(err)}"
        return body

    # conveniences
    def init(self) -> tuple[int, ...]:
        body = self.ok(fs.INIT, args=fs.INIT_IN.pack(7, 36, 128 << 10, 0xFFFFFFFF) + bytes(48))
        return fs.INIT_OUT.unpack(body)

    def lookup(self, name: str, parent: int = ROOT) -> tuple[int, tuple[int, ...]]:
        body = self.ok(fs.LOOKUP, parent, name.encode() + b"\0")
        return fs.ENTRY_OUT.unpack_from(body)[0], fs.ATTR.unpack_from(body, fs.ENTRY_OUT.size)

    def lookup_err(self, name: bytes, parent: int = ROOT) -> int:
        return self.call(fs.LOOKUP, parent, name + b"\0")[0]

    def create(self, name: str, parent: int = ROOT, flags: int = os.O_RDWR, mode: int = 0o644) -> tuple[int, int]:
        body = self.ok(fs.CREATE, parent, fs.CREATE_IN.pack(flags, stat.S_IFREG | mode, 0o022, 0)
                       + name.encode() + b"\0")
        nodeid = fs.ENTRY_OUT.unpack_from(body)[0]
        fh = fs.OPEN_OUT.unpack_from(body, fs.ENTRY_OUT.size + fs.ATTR.size)[0]
        return nodeid, fh

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return fs.OPEN_OUT.unpack(self.ok(fs.OPEN, nodeid, fs.OPEN_IN.pack(flags, 0)))[0]

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, split: int = 0) -> int:
        head = fs.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0)
        segs = [head] + ([data[i:i + split] for i in range(0, len(data), split)] if split else [data])
        body = self.ok(fs.WRITE, nodeid, segments=segs)
        return fs.WRITE_OUT.unpack(body)[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int, pages: bool = False) -> bytes:
        if not pages:
            return self.ok(fs.READ, nodeid, fs.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), out=16 + size)
        # as the guest sends it: the out header alone, then one buffer per page
        self.unique += 2
        req = fs.IN_HEADER.pack(80, fs.READ, self.unique, nodeid, 0, 0, 1, 0, 0) + fs.READ_IN.pack(
            fh, offset, size, 0, 0, 0, 0)
        pool, mem = self.pair.pool, self.pair.raw
        gin = pool.alloc(len(req))
        mem.write(gin, req)
        ins = [(pool.alloc(16), 16)] + [(pool.alloc(4096), min(4096, size - i)) for i in range(0, size, 4096)]
        self.pair.driver.add([(gin, len(req))], ins, token=self.unique)
        self.pair.driver.publish()
        (chain,) = self.pair.vq.pop_batch(1)
        n = self.dev.handle(1, chain)
        self.pair.vq.complete(chain, n)
        self.pair.vq.flush()
        self.pair.driver.get_used()
        length, error, _ = fs.OUT_HEADER.unpack(mem.read(ins[0][0], 16))
        assert error == 0 and length == n
        data = b"".join(mem.read(g, ln) for g, ln in ins[1:])[:n - 16]
        for g, _ in [(gin, 0), *ins]:
            pool.free(g)
        return data

    def release(self, nodeid: int, fh: int, op: int = fs.RELEASE) -> None:
        self.ok(op, nodeid, fs.RELEASE_IN.pack(fh, 0, 0, 0))

    def mkdir(self, name: str, parent: int = ROOT, mode: int = 0o755) -> int:
        body = self.ok(fs.MKDIR, parent, fs.MKDIR_IN.pack(mode, 0o022) + name.encode() + b"\0")
        return fs.ENTRY_OUT.unpack_from(body)[0]

    def getattr(self, nodeid: int) -> tuple[int, ...]:
        body = self.ok(fs.GETATTR, nodeid, fs.GETATTR_IN.pack(0, 0, 0))
        return fs.ATTR.unpack_from(body, fs.ATTR_OUT.size)

    def setattr(self, nodeid: int, valid: int, *, size: int = 0, mode: int = 0, uid: int = 0, gid: int = 0,
                atime: int = 0, mtime: int = 0, fh: int = 0) -> tuple[int, bytes]:
        args = fs.SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, 5, 7, 0, mode, 0, uid, gid, 0)
        return self.call(fs.SETATTR, nodeid, args)

    def readdir(self, nodeid: int, plus: bool = False, size: int = 4096) -> list[tuple[str, int, int]]:
        fh = fs.OPEN_OUT.unpack(self.ok(fs.OPENDIR, nodeid, fs.OPEN_IN.pack(0, 0)))[0]
        names: list[tuple[str, int, int]] = []
        offset = 0
        while True:
            body = self.ok(fs.READDIRPLUS if plus else fs.READDIR, nodeid,
                           fs.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), out=16 + size)
            if not body:
                break
            pos = 0
            while pos < len(body):
                nodeid_plus = 0
                if plus:
                    nodeid_plus = fs.ENTRY_OUT.unpack_from(body, pos)[0]
                    pos += fs.ENTRY_OUT.size + fs.ATTR.size
                ino, off, namelen, _typ = fs.DIRENT.unpack_from(body, pos)
                name = body[pos + fs.DIRENT.size:pos + fs.DIRENT.size + namelen].decode()
                names.append((name, ino, nodeid_plus))
                pos += (fs.DIRENT.size + namelen + 7) & ~7
                offset = off
        self.release(nodeid, fh, fs.RELEASEDIR)
        return names


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    return d


@pytest.fixture
def fuse(shared: Path) -> Iterator[Fuse]:
    dev = FsDevice(shared, tag="t")
    f = Fuse(dev)
    f.init()
    yield f
    dev.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- negotiation and plumbing ----------------------------------------------------------------------


def test_init_agrees_a_protocol_and_large_writes(shared: Path) -> None:
    dev = FsDevice(shared, tag="mytag", max_write=1 << 20)
    f = Fuse(dev)
    major, minor, _ra, flags, _bg, _cong, max_write, _gran, max_pages, _, _ = f.init()
    assert (major, minor) == (7, 36)
    assert flags & fs.DO_READDIRPLUS and flags & fs.POSIX_LOCKS and flags & fs.FLOCK_LOCKS
    assert max_write == 1 << 20 and max_pages == 256
    assert dev.config()[:6] == b"mytag\0" and dev.num_queues == 2
    dev.close()


def test_unknown_opcode_answers_enosys(fuse: Fuse) -> None:
    assert fuse.call(999)[0] == errno.ENOSYS
    assert fuse.call(fs.INTERRUPT + 3)[0] == errno.ENOSYS  # IOCTL


def test_forget_drops_the_inode_fd_and_stale_nodeids_answer_estale(fuse: Fuse, shared: Path) -> None:
    (shared / "f").write_bytes(b"x")
    before = open_fds()
    nodeid, _ = fuse.lookup("f")
    nodeid2, _ = fuse.lookup("f")
    assert nodeid2 == nodeid and open_fds() == before + 1  # one fd per host inode
    fuse.call(fs.FORGET, nodeid, fs.FORGET_IN.pack(1), out=0, queue=0)
    assert fuse.getattr(nodeid)[1] == 1  # one lookup left
    args = fs.BATCH_FORGET_IN.pack(1, 0) + fs.FORGET_ONE.pack(nodeid, 1)
    fuse.call(fs.BATCH_FORGET, ROOT, args, out=0, queue=0)
    assert open_fds() == before
    assert fuse.call(fs.GETATTR, nodeid, fs.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE


# --- files -------------------------------------------------------------------------------------------


def test_create_write_read_back_and_the_host_file_matches(fuse: Fuse, shared: Path) -> None:
    nodeid, fh = fuse.create("a.txt")
    data = os.urandom(300_000)
    assert fuse.write(nodeid, fh, 0, data, split=4096) == len(data)  # page-sized segments, as the guest sends
    assert fuse.read(nodeid, fh, 0, len(data)) == data
    assert fuse.read(nodeid, fh, 299_990, 100) == data[299_990:]
    # page-sized buffers (the array-form chain, read with one preadv of its iovecs)
    assert fuse.read(nodeid, fh, 0, 262_144, pages=True) == data[:262_144]
    assert fuse.read(nodeid, fh, 290_000, 20_000, pages=True) == data[290_000:]  # short at the end of file
    assert fuse.read(nodeid, fh, 5, 100_000, pages=True) == data[5:100_005]  # a partial last page
    # nothing to do at close: ENOSYS, so the guest stops sending FLUSH
    assert fuse.call(fs.FLUSH, nodeid, fs.FLUSH_IN.pack(fh, 0, 0, 0))[0] == errno.ENOSYS
    fuse.ok(fs.FSYNC, nodeid, fs.FSYNC_IN.pack(fh, 1, 0))
    fuse.release(nodeid, fh)
    assert (shared / "a.txt").read_bytes() == data
    assert stat.S_IMODE((shared / "a.txt").stat().st_mode) == 0o644
    assert fuse.lookup("a.txt")[1][1] == len(data)  # size attr
    # the stats say what each request type cost, and the time adds up
    st = fuse.dev.stats()["fs"]
    assert st["read_bytes"] >= len(data) + 262_144 and st["write_bytes"] == len(data)
    assert st["op_us"]["write"] > 0 and st["op_us"]["read"] > 0
    assert set(st["op_us"]) <= set(st["ops"]) and sum(st["op_us"].values()) == st["busy_us"]


def test_open_existing_file_with_truncate_and_append_without_writeback_cache(shared: Path) -> None:
    dev = FsDevice(shared, writeback=False)
    fuse = Fuse(dev)
    assert not fuse.init()[3] & fs.WRITEBACK_CACHE
    (shared / "f").write_bytes(b"hello")
    nodeid, _ = fuse.lookup("f")
    fh = fuse.open(nodeid, os.O_WRONLY | os.O_APPEND)
    fuse.write(nodeid, fh, 0, b" world")
    fuse.release(nodeid, fh)
    assert (shared / "f").read_bytes() == b"hello world"
    fh = fuse.open(nodeid, os.O_WRONLY | os.O_TRUNC)
    fuse.release(nodeid, fh)
    assert (shared / "f").read_bytes() == b""
    dev.close()


def test_with_writeback_cache_the_guest_places_appends_and_may_read_write_only_files(shared: Path) -> None:
    dev = FsDevice(shared, cache="auto")
    fuse = Fuse(dev)
    assert fuse.init()[3] & fs.WRITEBACK_CACHE
    (shared / "f").write_bytes(b"hello")
    nodeid, _ = fuse.lookup("f")
    fh = fuse.open(nodeid, os.O_WRONLY | os.O_APPEND)
    assert fuse.read(nodeid, fh, 0, 5) == b"hello"  # filling a page cache page
    fuse.write(nodeid, fh, 5, b" world")  # the guest's page cache computed the append offset
    fuse.write(nodeid, fh, 0, b"J")
    fuse.release(nodeid, fh)
    assert (shared / "f").read_bytes() == b"Jello world"
    dev.close()


def test_write_and_truncate_clear_setuid_when_the_guest_asks(fuse: Fuse, shared: Path) -> None:
    nodeid, fh = fuse.create("suid", mode=0o755)
    os.chmod(shared / "suid", 0o6755)
    head = fs.WRITE_IN.pack(fh, 0, 1, fs.WRITE_KILL_SUIDGID, 0, 0, 0)
    fuse.ok(fs.WRITE, nodeid, segments=[head, b"x"])
    assert stat.S_IMODE((shared / "suid").stat().st_mode) == 0o755
    os.chmod(shared / "suid", 0o4755)
    assert fuse.setattr(nodeid, fs.FATTR_SIZE | fs.FATTR_KILL_SUIDGID | fs.FATTR_FH, size=0, fh=fh)[0] == 0
    assert stat.S_IMODE((shared / "suid").stat().st_mode) == 0o755
    fuse.release(nodeid, fh)


def test_setattr_chmod_truncate_utimes_and_chown(fuse: Fuse, shared: Path) -> None:
    (shared / "f").write_bytes(b"0123456789")
    nodeid, _ = fuse.lookup("f")
    assert fuse.setattr(nodeid, fs.FATTR_MODE, mode=0o600)[0] == 0
    assert stat.S_IMODE((shared / "f").stat().st_mode) == 0o600
    err, body = fuse.setattr(nodeid, fs.FATTR_SIZE, size=4)
    assert err == 0 and fs.ATTR.unpack_from(body, fs.ATTR_OUT.size)[1] == 4
    assert (shared / "f").read_bytes() == b"0123"
    assert fuse.setattr(nodeid, fs.FATTR_ATIME | fs.FATTR_MTIME, atime=1000, mtime=2000)[0] == 0
    st = (shared / "f").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    assert fuse.setattr(nodeid, fs.FATTR_MTIME_NOW)[0] == 0
    assert (shared / "f").stat().st_mtime > 2000 and (shared / "f").stat().st_atime_ns == 1000 * 10**9 + 5
    if os.geteuid() == 0:
        assert fuse.setattr(nodeid, fs.FATTR_UID | fs.FATTR_GID, uid=1234, gid=4321)[0] == 0
        st = (shared / "f").stat()
        assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_mknod_makes_files_and_fifos_but_refuses_device_nodes(fuse: Fuse, shared: Path) -> None:
    for name, mode in (("fifo", stat.S_IFIFO | 0o644), ("reg", stat.S_IFREG | 0o644)):
        fuse.ok(fs.MKNOD, ROOT, fs.MKNOD_IN.pack(mode, 0, 0, 0) + name.encode() + b"\0")
    assert stat.S_ISFIFO((shared / "fifo").lstat().st_mode) and (shared / "reg").is_file()
    for mode in (stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o666):
        err, _ = fuse.call(fs.MKNOD, ROOT, fs.MKNOD_IN.pack(mode, os.makedev(1, 3), 0, 0) + b"dev\0")
        assert err == errno.EPERM
    assert not os.path.lexists(shared / "dev")


def test_fallocate_lseek_and_statfs(fuse: Fuse, shared: Path) -> None:
    nodeid, fh = fuse.create("sparse")
    fuse.ok(fs.FALLOCATE, nodeid, fs.FALLOCATE_IN.pack(fh, 0, 65536, 0, 0))
    assert (shared / "sparse").stat().st_size == 65536
    fuse.write(nodeid, fh, 0, b"d" * 4096)
    off = fs.LSEEK_OUT.unpack(fuse.ok(fs.LSEEK, nodeid, fs.LSEEK_IN.pack(fh, 0, os.SEEK_HOLE, 0)))[0]
    assert 4096 <= off <= 65536
    assert fuse.call(fs.LSEEK, nodeid, fs.LSEEK_IN.pack(fh, 0, 9, 0))[0] == errno.EINVAL
    body = fuse.ok(fs.STATFS, ROOT)
    blocks, _bfree, _bavail, _files, _ffree, bsize, namelen, _frsize, _ = fs.STATFS_OUT.unpack(body)
    assert blocks > 0 and bsize > 0 and namelen == 255


# --- directories and names ------------------------------------------------------------------------


def test_mkdir_rename_unlink_rmdir_change_the_host_tree(fuse: Fuse, shared: Path) -> None:
    d = fuse.mkdir("d")
    nodeid, fh = fuse.create("f", parent=d)
    fuse.release(nodeid, fh)
    fuse.ok(fs.RENAME, d, fs.RENAME_IN.pack(ROOT) + b"f\0g\0")
    assert (shared / "g").exists() and not (shared / "d" / "f").exists()
    (shared / "h").write_text("h")
    err, _ = fuse.call(fs.RENAME2, ROOT, fs.RENAME2_IN.pack(ROOT, fs.RENAME_NOREPLACE, 0) + b"g\0h\0")
    assert err == errno.EEXIST
    fuse.ok(fs.RENAME2, ROOT, fs.RENAME2_IN.pack(ROOT, fs.RENAME_EXCHANGE, 0) + b"g\0h\0")
    assert (shared / "g").read_text() == "h"
    assert fuse.call(fs.RMDIR, ROOT, b"g\0")[0] == errno.ENOTDIR
    fuse.ok(fs.UNLINK, ROOT, b"g\0")
    fuse.ok(fs.RMDIR, ROOT, b"d\0")
    assert sorted(p.name for p in shared.iterdir()) == ["h"]
    err, _ = fuse.call(fs.RENAME2, ROOT, fs.RENAME2_IN.pack(ROOT, 4, 0) + b"h\0w\0")  # WHITEOUT
    assert err == errno.EINVAL


def test_readdir_and_readdirplus_list_a_large_directory_across_calls(fuse: Fuse, shared: Path) -> None:
    for i in range(2000):
        (shared / f"file-{i:04d}").touch()
    names = fuse.readdir(ROOT)
    assert [n for n, _, _ in names[:2]] == [".", ".."]
    assert sorted(n for n, _, _ in names[2:]) == [f"file-{i:04d}" for i in range(2000)]
    plus = fuse.readdir(ROOT, plus=True)
    assert sorted(n for n, _, _ in plus[2:]) == [f"file-{i:04d}" for i in range(2000)]
    assert all(nodeid == 0 for _, _, nodeid in plus[:2]) and all(nodeid > 1 for _, _, nodeid in plus[2:])
    nodeid, _ = fuse.lookup("file-0007")
    assert nodeid in {n for _, _, n in plus}  # readdirplus made real lookups


def test_symlink_readlink_and_hard_link(fuse: Fuse, shared: Path) -> None:
    body = fuse.ok(fs.SYMLINK, ROOT, b"abs\0/etc/passwd\0")
    link = fs.ENTRY_OUT.unpack_from(body)[0]
    assert os.readlink(shared / "abs") == "/etc/passwd"  # stored as given
    assert fuse.ok(fs.READLINK, link) == b"/etc/passwd"
    (shared / "f").write_text("data")
    nodeid, _ = fuse.lookup("f")
    fuse.ok(fs.LINK, ROOT, fs.LINK_IN.pack(nodeid) + b"f2\0")
    assert (shared / "f2").stat().st_ino == (shared / "f").stat().st_ino


def test_xattrs_in_the_user_namespace(fuse: Fuse, shared: Path) -> None:
    (shared / "f").write_text("x")
    nodeid, _ = fuse.lookup("f")
    err, _ = fuse.call(fs.SETXATTR, nodeid, fs.SETXATTR_IN.pack(3, 0) + b"user.k\0abc")
    if err == errno.EOPNOTSUPP:
        pytest.skip("the host file system has no user xattrs")
    assert err == 0 and os.getxattr(shared / "f", "user.k") == b"abc"
    size = fs.GETXATTR_OUT.unpack(fuse.ok(fs.GETXATTR, nodeid, fs.GETXATTR_IN.pack(0, 0) + b"user.k\0"))[0]
    assert size == 3
    assert fuse.ok(fs.GETXATTR, nodeid, fs.GETXATTR_IN.pack(64, 0) + b"user.k\0") == b"abc"
    assert b"user.k\0" in fuse.ok(fs.LISTXATTR, nodeid, fs.GETXATTR_IN.pack(4096, 0))
    assert fuse.call(fs.GETXATTR, nodeid, fs.GETXATTR_IN.pack(1, 0) + b"user.k\0")[0] == errno.ERANGE
    fuse.ok(fs.REMOVEXATTR, nodeid, b"user.k\0")
    assert fuse.call(fs.GETXATTR, nodeid, fs.GETXATTR_IN.pack(64, 0) + b"user.k\0")[0] == errno.ENODATA
    err, _ = fuse.call(fs.SETXATTR, nodeid, fs.SETXATTR_IN.pack(4, 0) + b"security.capability\0abcd")
    assert err == errno.EPERM


def test_posix_locks_conflict_between_open_files_and_setlkw_does_not_hang(fuse: Fuse, shared: Path) -> None:
    nodeid, fh1 = fuse.create("locked")
    fh2 = fuse.open(nodeid, os.O_RDWR)
    lk = fs.LK_IN.pack(fh1, 1, 0, 99, fcntl_wrlck(), 0, 0, 0)
    fuse.ok(fs.SETLK, nodeid, lk)
    err, _ = fuse.call(fs.SETLK, nodeid, fs.LK_IN.pack(fh2, 2, 50, 60, fcntl_wrlck(), 0, 0, 0))
    assert err == errno.EAGAIN
    err, _ = fuse.call(fs.SETLKW, nodeid, fs.LK_IN.pack(fh2, 2, 50, 60, fcntl_wrlck(), 0, 0, 0))
    assert err == errno.EAGAIN  # bounded wait, then EAGAIN
    body = fuse.ok(fs.GETLK, nodeid, fs.LK_IN.pack(fh2, 2, 0, fs.OFFSET_MAX, fcntl_wrlck(), 0, 0, 0))
    start, end, typ, _ = fs.LK_OUT.unpack(body)
    assert (start, end, typ) == (0, 99, fcntl_wrlck())
    fuse.ok(fs.SETLK, nodeid, fs.LK_IN.pack(fh2, 2, 100, 200, fcntl_wrlck(), 0, 0, 0))  # no overlap
    # flock: exclusive on one handle excludes the other
    fuse.ok(fs.SETLK, nodeid, fs.LK_IN.pack(fh1, 1, 0, 0, fcntl_wrlck(), 0, fs.LK_FLOCK, 0))
    err, _ = fuse.call(fs.SETLK, nodeid, fs.LK_IN.pack(fh2, 2, 0, 0, fcntl_wrlck(), 0, fs.LK_FLOCK, 0))
    assert err == errno.EAGAIN
    fuse.release(nodeid, fh1)
    fuse.ok(fs.SETLK, nodeid, fs.LK_IN.pack(fh2, 2, 0, 0, fcntl_wrlck(), 0, fs.LK_FLOCK, 0))
    fuse.release(nodeid, fh2)


def fcntl_wrlck() -> int:
    import fcntl
    return fcntl.F_WRLCK


def test_read_only_share_refuses_every_change(shared: Path) -> None:
    (shared / "f").write_text("keep")
    dev = FsDevice(shared, read_only=True)
    f = Fuse(dev)
    f.init()
    nodeid, _ = f.lookup("f")
    assert f.call(fs.OPEN, nodeid, fs.OPEN_IN.pack(os.O_RDWR, 0))[0] == errno.EROFS
    assert f.call(fs.CREATE, ROOT, fs.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"n\0")[0] == errno.EROFS
    assert f.call(fs.UNLINK, ROOT, b"f\0")[0] == errno.EROFS
    assert f.call(fs.MKDIR, ROOT, fs.MKDIR_IN.pack(0o755, 0) + b"d\0")[0] == errno.EROFS
    assert f.setattr(nodeid, fs.FATTR_SIZE, size=0)[0] == errno.EROFS
    fh = f.open(nodeid)
    assert f.read(nodeid, fh, 0, 10) == b"keep"
    assert sorted(p.name for p in shared.iterdir()) == ["f"] and (shared / "f").read_text() == "keep"
    dev.close()


def test_new_entries_belong_to_the_guest_caller(fuse: Fuse, shared: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    fuse.ok(fs.MKDIR, ROOT, fs.MKDIR_IN.pack(0o755, 0) + b"d\0", uid=1000)
    assert (shared / "d").stat().st_uid == 1000


# --- escapes ---------------------------------------------------------------------------------------


def test_missing_names_answer_a_cacheable_negative_entry(fuse: Fuse) -> None:
    body = fuse.ok(fs.LOOKUP, ROOT, b"nothing-here\0")
    nodeid, _gen, entry_valid, *_ = fs.ENTRY_OUT.unpack_from(body)
    assert nodeid == 0 and entry_valid == 1


def test_dotdot_at_the_root_stays_at_the_root(fuse: Fuse, shared: Path) -> None:
    nodeid, attr = fuse.lookup("..")
    assert nodeid == ROOT and attr[0] == shared.stat().st_ino
    assert fuse.lookup(".")[0] == ROOT
    d = fuse.mkdir("sub")
    assert fuse.lookup("..", parent=d)[0] == ROOT


def test_names_with_slashes_cannot_reach_outside(fuse: Fuse, shared: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    for name in (b"../secret", b"/etc/passwd", b"sub/../../secret", b""):
        assert fuse.lookup_err(name) == errno.EINVAL
    assert fuse.call(fs.CREATE, ROOT, fs.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"../x\0")[0] == errno.EINVAL
    assert fuse.call(fs.MKDIR, ROOT, fs.MKDIR_IN.pack(0o755, 0) + b"..\0")[0] == errno.EINVAL
    assert fuse.call(fs.RENAME, ROOT, fs.RENAME_IN.pack(ROOT) + b"..\0x\0")[0] == errno.EINVAL
    assert fuse.call(fs.SYMLINK, ROOT, b"../x\0target\0")[0] == errno.EINVAL
    assert not (tmp_path / "x").exists()


def test_symlinks_to_outside_are_never_followed_by_the_host(fuse: Fuse, shared: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    os.symlink(str(outside), shared / "abs")
    os.symlink("../outside/secret", shared / "rel")
    nodeid, attr = fuse.lookup("abs")
    assert stat.S_ISLNK(attr[9])  # the link itself, not the outside directory
    assert fuse.lookup_err(b"secret", parent=nodeid) == errno.ENOTDIR  # not a directory to look into
    rel, _ = fuse.lookup("rel")
    assert fuse.call(fs.OPEN, rel, fs.OPEN_IN.pack(os.O_RDONLY, 0))[0] == errno.ELOOP
    assert fuse.setattr(rel, fs.FATTR_SIZE, size=0)[0] == errno.EINVAL
    assert fuse.setattr(rel, fs.FATTR_MODE, mode=0o777)[0] == errno.EOPNOTSUPP
    assert fuse.call(fs.SETXATTR, rel, fs.SETXATTR_IN.pack(1, 0) + b"user.a\0b")[0] == errno.EPERM
    # creating through an existing symlink does not write its target
    err, _ = fuse.call(fs.CREATE, ROOT, fs.CREATE_IN.pack(os.O_RDWR | os.O_TRUNC, 0o100644, 0, 0) + b"rel\0")
    assert err == errno.ELOOP
    assert (outside / "secret").read_text() == "secret"
    assert stat.S_IMODE((outside / "secret").stat().st_mode) != 0o777


def test_device_nodes_in_the_share_are_not_opened(fuse: Fuse, shared: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a device node needs root")
    os.mknod(shared / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    nodeid, _ = fuse.lookup("null")
    assert fuse.call(fs.OPEN, nodeid, fs.OPEN_IN.pack(os.O_RDWR, 0))[0] == errno.EACCES
    assert fuse.setattr(nodeid, fs.FATTR_SIZE, size=0)[0] == errno.EINVAL


def test_hard_links_only_from_inodes_the_guest_already_holds(fuse: Fuse, shared: Path) -> None:
    assert fuse.call(fs.LINK, ROOT, fs.LINK_IN.pack(987654) + b"x\0")[0] == errno.ESTALE
    d = fuse.mkdir("d")
    assert fuse.call(fs.LINK, ROOT, fs.LINK_IN.pack(d) + b"x\0")[0] == errno.EPERM  # no directory links
    assert not (shared / "x").exists()


def test_dotdot_of_a_directory_moved_outside_is_refused(fuse: Fuse, shared: Path, tmp_path: Path) -> None:
    (shared / "a" / "b").mkdir(parents=True)
    a, _ = fuse.lookup("a")
    b, _ = fuse.lookup("b", parent=a)
    os.rename(shared / "a", tmp_path / "moved")  # a host process moves the tree out of the share
    assert fuse.lookup_err(b"..", parent=b) != 0 or fuse.lookup("..", parent=b)[0] != a
    assert fuse.lookup_err(b"..", parent=a) == errno.EACCES  # its parent is the temp dir: outside


#: the racing host process: swaps shared/d between the real directory and a symlink to outside
SWAPPER = """
import os, sys
s = sys.argv[1]
j = os.path.join
while True:
    os.rename(j(s, "d"), j(s, "real")); os.rename(j(s, "link"), j(s, "d"))
    os.rename(j(s, "d"), j(s, "link")); os.rename(j(s, "real"), j(s, "d"))
"""


def test_racing_host_swaps_directory_for_symlink_during_lookups(fuse: Fuse, shared: Path, tmp_path: Path) -> None:
    """A host process keeps replacing `shared/d` (a directory holding `f`)
    with a symlink to an outside directory holding `f` too. Every lookup of
    `d/f` finds the inside file or fails; none reaches the outside one."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("OUTSIDE")
    (shared / "real").mkdir()
    (shared / "real" / "f").write_text("inside")
    os.symlink(str(outside), shared / "link")
    os.rename(shared / "real", shared / "d")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(shared)])
    reached = {"inside": 0, "refused": 0}
    try:
        for _ in range(150):
            err, body = fuse.call(fs.LOOKUP, ROOT, b"d\0")
            if err:
                reached["refused"] += 1
                continue
            d = fs.ENTRY_OUT.unpack_from(body)[0]
            err, body = fuse.call(fs.LOOKUP, d, b"f\0")
            if err:
                reached["refused"] += 1
                continue
            f = fs.ENTRY_OUT.unpack_from(body)[0]
            err, body = fuse.call(fs.OPEN, f, fs.OPEN_IN.pack(os.O_RDONLY, 0))
            if err:
                reached["refused"] += 1
                continue
            fh = fs.OPEN_OUT.unpack(body)[0]
            data = fuse.read(f, fh, 0, 100)
            fuse.release(f, fh)
            assert data == b"inside"
            reached["inside"] += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert reached["inside"] > 0 and reached["refused"] > 0
    assert (outside / "f").read_text() == "OUTSIDE"


def test_openat2_refuses_paths_that_leave_the_directory(shared: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    os.symlink("/", shared / "root")
    dfd = os.open(shared, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in ("../secret", "root/etc", "/etc/passwd"):
            with pytest.raises(OSError) as e:
                os.close(fs.openat2(dfd, path, os.O_RDONLY))
            assert e.value.errno in (errno.EXDEV, errno.ELOOP)
    finally:
        os.close(dfd)


def test_malformed_requests_answer_einval_and_leave_the_device_working(fuse: Fuse, shared: Path) -> None:
    assert fuse.call(fs.MKDIR, ROOT, b"\x01")[0] == errno.EINVAL  # args too short
    assert fuse.call(fs.SETATTR, ROOT, b"")[0] == errno.EINVAL
    assert fuse.call(fs.READ, ROOT, fs.READ_IN.pack(77, 0, 10, 0, 0, 0, 0))[0] == errno.EBADF
    assert fuse.call(fs.GETATTR, ROOT, fs.GETATTR_IN.pack(0, 0, 0), out=24)[0] == errno.EIO  # no room for it
    fuse.call(0xDEAD)
    assert fuse.dev.stats()["fs"]["ops"]["unknown"] == 1
    # a readable part shorter than the header: completed with nothing written
    fuse.pair.driver.add([(fuse.pair.pool.alloc(8), 8)], [(fuse.pair.pool.alloc(64), 64)], token="short")
    fuse.pair.driver.publish()
    (chain,) = fuse.pair.vq.pop_batch(1)
    assert fuse.dev.handle(1, chain) == 0
    fuse.pair.vq.complete(chain, 0)
    fuse.pair.vq.flush()
    fuse.pair.driver.get_used()
    fuse.mkdir("still-works")
    assert (shared / "still-works").is_dir()


def test_destroy_closes_every_handle_and_inode(shared: Path) -> None:
    (shared / "f").write_text("x")
    dev = FsDevice(shared)
    f = Fuse(dev)
    f.init()
    before = open_fds()
    nodeid, _ = f.lookup("f")
    f.open(nodeid)
    assert open_fds() == before + 2  # the inode's O_PATH fd and the open file
    f.ok(fs.DESTROY)
    assert open_fds() == before
    dev.close()


def test_struct_layouts_match_the_fuse_abi() -> None:
    sizes = {fs.IN_HEADER: 40, fs.OUT_HEADER: 16, fs.ATTR: 88, fs.INIT_OUT: 64, fs.SETATTR_IN: 88,
             fs.READ_IN: 40, fs.LK_IN: 48, fs.STATFS_OUT: 80, fs.RELEASE_IN: 24, fs.FS_CONFIG: 40}
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}
    assert fs.ENTRY_OUT.size + fs.ATTR.size == 128 and fs.ATTR_OUT.size + fs.ATTR.size == 104
    assert struct.calcsize(fs.FLOCK.format) == 32


# --- the command ------------------------------------------------------------------------------------


def test_print_capabilities_names_the_fs_type() -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirtio", "fs", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    assert out == '{"type": "fs"}\n'
    r = subprocess.run([sys.executable, "-m", "pyvirtio", "fs", "--socket-path", "/tmp/x.sock"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "--shared-dir is required" in r.stderr


def test_cache_never_opens_files_for_direct_io_and_caches_nothing(shared: Path) -> None:
    (shared / "f").write_text("x")
    dev = FsDevice(shared, cache="never")
    f = Fuse(dev)
    assert not f.init()[3] & fs.WRITEBACK_CACHE
    body = f.ok(fs.LOOKUP, ROOT, b"f\0")
    nodeid, _gen, entry_valid, attr_valid, *_ = fs.ENTRY_OUT.unpack_from(body)
    assert entry_valid == 0 and attr_valid == 0
    _fh, open_flags, _ = fs.OPEN_OUT.unpack(f.ok(fs.OPEN, nodeid, fs.OPEN_IN.pack(os.O_RDONLY, 0)))
    assert open_flags & fs.FOPEN_DIRECT_IO
    assert f.call(fs.LOOKUP, ROOT, b"missing\0")[0] == errno.ENOENT  # no negative entry to cache
    dev.close()


def test_metadata_cache_is_direct_io_with_names_and_attributes_cached(shared: Path) -> None:
    (shared / "f").write_text("x")
    assert FsDevice(shared).cache == "auto"  # the default, as virtiofsd's
    dev = FsDevice(shared, cache="metadata")
    f = Fuse(dev)
    assert not f.init()[3] & fs.WRITEBACK_CACHE  # no page cache for data: nothing to write back
    body = f.ok(fs.LOOKUP, ROOT, b"f\0")
    nodeid, _gen, entry_valid, attr_valid, *_ = fs.ENTRY_OUT.unpack_from(body)
    assert entry_valid == 1 and attr_valid == 1
    fh, open_flags, _ = fs.OPEN_OUT.unpack(f.ok(fs.OPEN, nodeid, fs.OPEN_IN.pack(os.O_WRONLY | os.O_APPEND, 0)))
    assert open_flags & fs.FOPEN_DIRECT_IO
    f.write(nodeid, fh, 0, b"y")  # O_APPEND kept on the host (no write-back cache placing appends)
    f.release(nodeid, fh)
    assert (shared / "f").read_text() == "xy"
    assert fs.OPEN_OUT.unpack_from(f.ok(fs.CREATE, ROOT, fs.CREATE_IN.pack(os.O_RDWR, 0o100644, 0o022, 0)
                                        + b"h\0"), fs.ENTRY_OUT.size + fs.ATTR.size)[1] & fs.FOPEN_DIRECT_IO
    nodeid0, _, entry_valid, *_ = fs.ENTRY_OUT.unpack_from(f.ok(fs.LOOKUP, ROOT, b"missing\0"))
    assert nodeid0 == 0 and entry_valid == 1  # a negative entry the guest may cache
    dev.close()


def test_command_serves_fuse_over_vhost_user_and_reports_counters(shared: Path, tmp_path: Path) -> None:
    from pyvirtio.vhost_user import Request
    from vhost_client import NetFrontend

    (shared / "hello").write_text("hello")
    sock = tmp_path / "fs.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "fs", "--socket-path", str(sock), "--shared-dir",
                             str(shared), "--tag", "t1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fe = None
    try:
        for _ in range(500):
            if sock.exists():
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        fe = NetFrontend(str(sock), event_idx=False)
        fe.negotiate()
        assert fe.client.call(Request.GET_QUEUE_NUM).body.value == 2  # type: ignore[union-attr]
        fe.setup_ring(0)
        ring = fe.setup_ring(1)
        mem, pool = fe.mem.mem, fe.pool
        replies = []
        for unique, (opcode, args) in enumerate(
                [(fs.INIT, fs.INIT_IN.pack(7, 36, 65536, 0) + bytes(48)), (fs.LOOKUP, b"hello\0")], 1):
            req = fs.IN_HEADER.pack(fs.IN_HEADER.size + len(args), opcode, unique, ROOT, 0, 0, 1, 0, 0) + args
            gin, gout = pool.alloc(len(req)), pool.alloc(512)
            mem.write(gin, req)
            ring.driver.add([(gin, len(req))], [(gout, 512)], gout)
            ring.driver.publish()
            fe.kick(1)
            ((token, n),) = fe.reap(1, 1)
            replies.append(mem.read(token, n))  # type: ignore[arg-type]
        _length, error, unique = fs.OUT_HEADER.unpack_from(replies[1])
        assert (error, unique) == (0, 2)
        assert fs.ATTR.unpack_from(replies[1], 16 + fs.ENTRY_OUT.size)[1] == 5  # the size of "hello"
    finally:
        if fe is not None:
            fe.close()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    exit_line = [line for line in err.decode().splitlines() if line.startswith('{"event":"exit"')]
    assert exit_line and '"fs":{"requests":2,"errors":0' in exit_line[0]
    assert not sock.exists()


def test_an_oversized_request_is_refused_without_reading_it(fuse: Fuse) -> None:
    err, _ = fuse.call(fs.MKDIR, ROOT, fs.MKDIR_IN.pack(0o755, 0) + b"d\0" + bytes(fs.MAX_REQUEST))
    assert err == errno.EINVAL
    assert fuse.lookup_err(b"d") == 0 and fuse.ok(fs.LOOKUP, ROOT, b"d\0")[:8] == bytes(8)  # not made
