"""virtio-fs: a host directory shared with the guest over FUSE requests.

The device is a `pyvirtio.Device`: queue 0 is the high-priority queue
(FORGET, BATCH_FORGET, INTERRUPT), queues 1.. carry every other request. A
request chain holds, device-readable, a `fuse_in_header` and the operation's
arguments (for WRITE followed by the data) and, device-writable, room for a
`fuse_out_header` and the reply. Errors are `-errno` in the out header;
unknown opcodes answer -ENOSYS.

Containment (the guest never reaches outside `shared_dir`):

- every inode the guest knows is an `O_PATH | O_NOFOLLOW` fd in a table
  keyed by the host's (st_dev, st_ino); nodeids index that table and
  FORGET drops lookup counts;
- names are single components: a name holding '/' or NUL is refused, '.'
  and '..' are refused where an entry is made, a lookup of '..' at the root
  answers the root, elsewhere the parent is checked to lie under the root;
- every operation works relative to a directory fd (`*at()` calls, the
  final component never followed), with `openat2(RESOLVE_BENEATH |
  RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)` where the host has it;
- files are opened by re-opening the inode's O_PATH fd through
  /proc/self/fd, for regular files and directories only (a symlink or a
  device node is never opened, chmod-ed, truncated or given xattrs by the
  host); symlink targets are stored as given and never followed here;
- LINK's source is an inode already in the table; MKNOD makes regular
  files, fifos and sockets only;
- SETXATTR/REMOVEXATTR are limited to the `user.` namespace (a guest must
  not set `security.capability` or `trusted.*` on host files).

Caching (`cache`, as virtiofsd names the modes, and with its default,
`auto`): `metadata` opens every file for direct I/O (no guest page cache for file data, like 9p's
default cache=none: each read() and write() is one request of up to
`max_write` bytes moved straight between the host file and the caller's
pages; the guest then refuses MAP_SHARED mmap of the file, while MAP_PRIVATE
mmap and exec still work) and lets the guest cache names and attributes for
`timeout` seconds (1 s; missing names too: a LOOKUP that finds nothing
answers nodeid 0 with that timeout; virtiofsd's `metadata` caches them a
day, `timeout=86400` here). `never` is direct I/O with nothing cached.
`auto` (default) and `always` cache names and attributes the same way (1 s,
a day) and keep file data in the guest's page cache, needed for shared
writable mmap and fast re-reads; unless `writeback=False` it is a write-back cache
(FUSE_WRITEBACK_CACHE: writes are flushed in the background, many requests
in flight; files opened write-only are opened read-write on the host and
O_APPEND is left to the guest, which sends every WRITE with its offset).
`auto` is the default because programs expect shared mmap to work on a
file system. Under TCG every byte through the guest's page cache is also
copied by the emulated guest CPU (~90 MB/s for a guest's read of its own
tmpfs), which caps a page-cache read far below a direct one: there,
`metadata` is the faster choice for bulk data.

HANDLE_KILLPRIV_V2: the device clears set-user/group-ID bits when a WRITE,
truncate or O_TRUNC open asks it to, and the guest skips a GETXATTR
(security.capability) round trip per write. FLUSH answers ENOSYS (nothing
to do at close: data is on the host when WRITE answers, locks belong to
the open file), so the guest stops sending it.

Locks: POSIX locks (GETLK/SETLK/SETLKW) are host open-file-description
locks on the file handle's fd, flock() is flock on that fd. SETLKW never
blocks a queue for long: it retries a non-blocking lock for up to
`lock_wait` seconds and then answers -EAGAIN (the guest's F_SETLKW then
fails with EAGAIN instead of waiting). Two guest processes sharing one open
file (fork) share its host lock state.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

from pyvirtio.device import RING_FEATURES, Device
from pyvirtio.queue import Chain, IovChain

log = logging.getLogger(__name__)

# --- the FUSE protocol (linux include/uapi/linux/fuse.h), layouts built once ---------------------

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 36
FUSE_ROOT_ID = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs; + ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid nsec dummy; + ATTR
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows from 7.36)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs, 80 bytes
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")  # size flags
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")
LK_IN = struct.Struct("<QQQQIIII")  # fh owner start end type pid lk_flags padding
LK_OUT = struct.Struct("<QQII")  # start end type pid
ACCESS_IN = struct.Struct("<II")
DIRENT = struct.Struct("<QQII")  # ino off namelen type; + name, padded to 8
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = 27, 28, 29, 30, 31, 32, 33, 34, 35
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK, SYNCFS = 36, 38, 42, 43, 44, 45, 46, 50

OPCODE_NAMES = {
    LOOKUP: "lookup", FORGET: "forget", GETATTR: "getattr", SETATTR: "setattr", READLINK: "readlink",
    SYMLINK: "symlink", MKNOD: "mknod", MKDIR: "mkdir", UNLINK: "unlink", RMDIR: "rmdir", RENAME: "rename",
    LINK: "link", OPEN: "open", READ: "read", WRITE: "write", STATFS: "statfs", RELEASE: "release",
    FSYNC: "fsync", SETXATTR: "setxattr", GETXATTR: "getxattr", LISTXATTR: "listxattr",
    REMOVEXATTR: "removexattr", FLUSH: "flush", INIT: "init", OPENDIR: "opendir", READDIR: "readdir",
    RELEASEDIR: "releasedir", FSYNCDIR: "fsyncdir", GETLK: "getlk", SETLK: "setlk", SETLKW: "setlkw",
    ACCESS: "access", CREATE: "create", INTERRUPT: "interrupt", DESTROY: "destroy", BATCH_FORGET: "batch_forget",
    FALLOCATE: "fallocate", READDIRPLUS: "readdirplus", RENAME2: "rename2", LSEEK: "lseek", SYNCFS: "syncfs",
}

# FUSE_INIT flags
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
WRITEBACK_CACHE = 1 << 16
HANDLE_KILLPRIV_V2 = 1 << 28

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

#: cache modes (as virtiofsd names them) and the name/attribute timeout each implies:
#: never: no guest page cache for file data (direct I/O, like 9p's cache=none;
#: MAP_SHARED mmap is refused by the guest), nothing cached;
#: metadata: direct I/O for data, names and attributes cached 1 s;
#: auto (default, as virtiofsd's): page cache kept while a file is open,
#: write-back cache, 1 s timeouts;
#: always: page cache kept across opens, write-back cache, a day's timeouts
#: (only for a directory nothing else changes).
CACHE_MODES = {"never": 0.0, "metadata": 1.0, "auto": 1.0, "always": 86400.0}
DEFAULT_CACHE = "auto"


def cache_uses_page_cache(mode: str) -> bool:
    return mode in ("auto", "always")


# setattr valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME = 1, 2, 4, 8, 16, 32
FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 64, 128, 256
FATTR_KILL_SUIDGID = 1 << 11
WRITE_KILL_SUIDGID = 1 << 2
OPEN_KILL_SUIDGID = 1 << 0

GETATTR_FH = 1
LK_FLOCK = 1
RELEASE_FLOCK_UNLOCK = 2
FSYNC_FDATASYNC = 1
OFFSET_MAX = (1 << 63) - 1

# Linux constants Python's os/fcntl modules lack
F_OFD_GETLK, F_OFD_SETLK = 36, 37
FLOCK = struct.Struct("hhxxxxqqi4x")  # struct flock on x86_64/aarch64
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine)

#: open(2) flags the guest may pass through to the host (access mode, append, sync, trunc, noatime)
OPEN_FLAGS_ALLOWED = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NONBLOCK
                      | getattr(os, "O_NOATIME", 0))

#: the longest request other than WRITE read from the guest (xattr values are at most 64 KiB)
MAX_REQUEST = 1 << 18

#: virtio-fs config space: tag (36 bytes, NUL padded), num_request_queues
FS_CONFIG = struct.Struct("<36sI")
TAG_MAX = 36

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
for _f in (_libc.preadv, _libc.pwritev):
    _f.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)
    _f.restype = ctypes.c_ssize_t
IOV_MAX = 1024


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _check(rc: int) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


class FsError(OSError):
    """A request the device refuses (carries the errno answered)."""


def _err(code: int) -> FsError:
    return FsError(code, os.strerror(code))


_openat2_works: bool | None = None


def openat2(dirfd: int, name: str | bytes, flags: int, mode: int = 0,
            resolve: int = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS) -> int:
    """openat2(2) through ctypes; falls back to openat(O_NOFOLLOW) for a
    single component when the host kernel lacks it (before 5.6)."""
    global _openat2_works
    if SYS_OPENAT2 is not None and _openat2_works is not False:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        path = os.fsencode(name)
        fd = _libc.syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            _openat2_works = True
            return int(fd)
        e = ctypes.get_errno()
        if e != errno.ENOSYS:
            raise OSError(e, os.strerror(e), os.fsdecode(path))
        _openat2_works = False
    if b"/" in os.fsencode(name):
        raise _err(errno.EXDEV)
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _encode_dev(rdev: int) -> int:
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _split_name(data: bytes) -> str:
    """One NUL-terminated name from the start of `data`, checked to be a single component."""
    end = data.find(b"\0")
    raw = data if end < 0 else data[:end]
    if not raw or b"/" in raw:
        raise _err(errno.EINVAL)
    return os.fsdecode(raw)


def _new_name(data: bytes) -> str:
    name = _split_name(data)
    if name in (".", ".."):
        raise _err(errno.EINVAL)
    return name


def _two_names(data: bytes) -> tuple[str, str]:
    end = data.find(b"\0")
    if end < 0:
        raise _err(errno.EINVAL)
    return _split_name(data[:end + 1]), data[end + 1:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass
class Inode:
    """One host inode the guest holds: its O_PATH fd and FUSE lookup count."""

    nodeid: int
    fd: int
    key: tuple[int, int]
    mode: int
    nlookup: int = 0


@dataclass
class Handle:
    """An open file or directory: the host fd and, for directories, the listing."""

    fd: int
    nodeid: int
    is_dir: bool = False
    entries: list[tuple[str, int, int]] | None = None  # (name, ino, d_type)


class FsDevice(Device):
    """virtio-fs serving `shared_dir` (see the module docstring for what is allowed)."""

    device_id = "fs"
    features = RING_FEATURES

    def __init__(self, shared_dir: str | os.PathLike[str], *, tag: str = "pyvirtio", read_only: bool = False,
                 request_queues: int = 1, cache: str = DEFAULT_CACHE, timeout: float | None = None,
                 max_write: int = 1 << 20,
                 lock_wait: float = 0.5, xattr: bool = True, writeback: bool = True) -> None:
        if not tag or len(tag.encode()) > TAG_MAX:
            raise ValueError(f"tag must be 1..{TAG_MAX} bytes")
        if request_queues < 1:
            raise ValueError("request_queues must be >= 1")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}")
        if timeout is None:
            timeout = CACHE_MODES[cache]
        self.shared_dir = os.path.abspath(shared_dir)
        self.tag = tag
        self.read_only = read_only
        self.request_queues = request_queues
        self.num_queues = 1 + request_queues
        self.cache = cache
        self.timeout = timeout
        #: FOPEN_* flags every OPEN/CREATE answers
        self._open_flags = {"never": FOPEN_DIRECT_IO, "metadata": FOPEN_DIRECT_IO, "auto": 0,
                            "always": FOPEN_KEEP_CACHE}[cache]
        self.max_write = max_write
        self.lock_wait = lock_wait
        self.xattr = xattr
        self.writeback = writeback
        #: the guest keeps a write-back page cache (negotiated at INIT)
        self._wb = False
        self.uid = os.geteuid()
        self.gid = os.getegid()
        root_fd = os.open(self.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self.root = Inode(FUSE_ROOT_ID, root_fd, (st.st_dev, st.st_ino), st.st_mode, nlookup=1 << 62)
        self._lock = threading.Lock()
        self._inodes: dict[int, Inode] = {FUSE_ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._handles: dict[int, Handle] = {}
        self._next_nodeid = FUSE_ROOT_ID + 1
        self._next_fh = 1
        self._valid = (int(timeout), int((timeout % 1) * 1e9))
        #: requests per opcode
        self.ops_seen: dict[int, int] = {}
        #: microseconds spent serving each opcode
        self.op_us: dict[int, int] = {}
        #: the opcode being served, per queue thread
        self._current = threading.local()
        self.counters = {"requests": 0, "errors": 0, "busy_us": 0, "reads": 0, "read_bytes": 0, "writes": 0,
                         "write_bytes": 0}
        self._ops: dict[int, Callable[[tuple[int, ...], bytes, Chain], bytes | None]] = {
            INIT: self._init, DESTROY: self._destroy, LOOKUP: self._lookup, GETATTR: self._getattr,
            SETATTR: self._setattr, READLINK: self._readlink, SYMLINK: self._symlink, MKNOD: self._mknod,
            MKDIR: self._mkdir, UNLINK: self._unlink, RMDIR: self._rmdir, RENAME: self._rename,
            RENAME2: self._rename2, LINK: self._link, OPEN: self._open, CREATE: self._create,
            FLUSH: self._flush, RELEASE: self._release, RELEASEDIR: self._release, FSYNC: self._fsync,
            FSYNCDIR: self._fsync, OPENDIR: self._opendir, READDIR: self._readdir,
            READDIRPLUS: self._readdirplus, STATFS: self._statfs, ACCESS: self._access,
            SETXATTR: self._setxattr, GETXATTR: self._getxattr, LISTXATTR: self._listxattr,
            REMOVEXATTR: self._removexattr, GETLK: self._getlk, SETLK: self._setlk, SETLKW: self._setlkw,
            FALLOCATE: self._fallocate, LSEEK: self._lseek, SYNCFS: self._syncfs,
        }

    # --- the Device API ---------------------------------------------------------------------

    def config(self) -> bytes:
        return FS_CONFIG.pack(self.tag.encode(), self.request_queues)

    def reset(self) -> None:
        self._forget_all()

    def stats(self) -> dict[str, object]:
        ops = {OPCODE_NAMES.get(op, "unknown"): n for op, n in sorted(self.ops_seen.items())}
        op_us = {OPCODE_NAMES.get(op, "unknown"): us for op, us in sorted(self.op_us.items())}
        return {"fs": {**self.counters, "inodes": len(self._inodes), "handles": len(self._handles), "ops": ops,
                       "op_us": op_us}}

    def queue_role(self, index: int) -> str:
        return "hiprio" if index == 0 else f"req{index - 1}"

    def close(self) -> None:
        """Close every fd the device holds (the root too): the device is unusable after."""
        self._forget_all()
        os.close(self.root.fd)

    def handle(self, queue: int, chain: Chain) -> int:
        t = time.perf_counter()
        self._current.op = -1
        try:
            return self._handle_request(chain)
        finally:
            us = int((time.perf_counter() - t) * 1e6)
            self.counters["busy_us"] += us
            op = self._current.op
            self.op_us[op] = self.op_us.get(op, 0) + us

    def _handle_request(self, chain: Chain) -> int:
        if chain.readable_len < IN_HEADER.size:
            log.warning("fs: request of %d bytes, shorter than a fuse_in_header", chain.readable_len)
            return 0
        head = _head(chain, IN_HEADER.size + WRITE_IN.size) if chain.readable_len > 4096 else _head(chain)
        hdr = IN_HEADER.unpack_from(head)
        _length, opcode, unique = hdr[0], hdr[1], hdr[2]
        self.counters["requests"] += 1
        ops = self.ops_seen
        key = opcode if opcode in OPCODE_NAMES else -1  # bounded: a guest may send any number
        ops[key] = ops.get(key, 0) + 1
        self._current.op = key
        if opcode in (FORGET, BATCH_FORGET, INTERRUPT):
            if opcode == FORGET:
                self._forget(hdr[3], FORGET_IN.unpack_from(head, IN_HEADER.size)[0])
            elif opcode == BATCH_FORGET:
                self._batch_forget(head)
            return 0  # no reply
        if opcode != WRITE and len(head) < chain.readable_len:
            if chain.readable_len > MAX_REQUEST:  # no operation but WRITE carries more than names and an xattr
                self.counters["errors"] += 1
                return chain.write(OUT_HEADER.pack(OUT_HEADER.size, -errno.EINVAL, unique))
            head = _head(chain)
        try:
            if opcode == WRITE:
                return self._write(hdr, head, chain)
            if opcode == READ:
                return self._read(hdr, head, chain)
            op = self._ops.get(opcode)
            if op is None:
                raise _err(errno.ENOSYS)
            reply = op(hdr, head[IN_HEADER.size:], chain)
            body = b"" if reply is None else reply
            if OUT_HEADER.size + len(body) > chain.writable_len:
                raise _err(errno.EIO)  # the guest left no room for the reply
            return chain.write(OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)
        except OSError as e:
            code = e.errno or errno.EIO
            if not isinstance(e, FsError) and code not in (errno.ENOENT, errno.ENOSYS):
                log.debug("fs: opcode %d: %s", opcode, e)
            self.counters["errors"] += 1
            return chain.write(OUT_HEADER.pack(OUT_HEADER.size, -code, unique))
        except (struct.error, ValueError, UnicodeError) as e:
            log.debug("fs: opcode %d: bad request: %s", opcode, e)
            self.counters["errors"] += 1
            return chain.write(OUT_HEADER.pack(OUT_HEADER.size, -errno.EINVAL, unique))

    # --- the inode table --------------------------------------------------------------------

    def _inode(self, nodeid: int) -> Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise _err(errno.ESTALE)
        return ino

    def _dir(self, nodeid: int) -> Inode:
        ino = self._inode(nodeid)
        if not stat.S_ISDIR(ino.mode):
            raise _err(errno.ENOTDIR)
        return ino

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        return h

    def _open_beneath(self, parent: Inode, name: str) -> int:
        """An O_PATH fd for `name` in directory `parent`, never following a symlink."""
        if name == "..":
            return self._open_parent(parent)
        if name == ".":
            return os.dup(parent.fd)
        return openat2(parent.fd, name, os.O_PATH | os.O_NOFOLLOW)

    def _open_parent(self, parent: Inode) -> int:
        """'..' of `parent`: the root stays the root; elsewhere checked to be under the root
        (a host process may have moved the directory out of the shared tree)."""
        if parent.nodeid == FUSE_ROOT_ID or parent.key == self.root.key:
            return os.dup(self.root.fd)
        fd = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent.fd)
        cur = os.dup(fd)
        try:
            for _ in range(4096):
                st = os.fstat(cur)
                if (st.st_dev, st.st_ino) == self.root.key:
                    return fd
                up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                ust = os.fstat(up)
                os.close(cur)
                cur = up
                if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):
                    break  # reached the host's / without meeting the root
        finally:
            os.close(cur)
        os.close(fd)
        raise _err(errno.EACCES)

    def _add(self, fd: int, st: os.stat_result) -> Inode:
        """Enter an O_PATH fd into the table (one more lookup); takes the fd."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            ino = self._by_key.get(key)
            if ino is not None and ino.nodeid in self._inodes:
                os.close(fd)
            else:
                ino = Inode(self._next_nodeid, fd, key, st.st_mode)
                self._next_nodeid += 1
                self._inodes[ino.nodeid] = ino
                self._by_key[key] = ino
            ino.nlookup += 1
            ino.mode = st.st_mode
            return ino

    def _forget(self, nodeid: int, n: int) -> None:
        if nodeid == FUSE_ROOT_ID:
            return
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None:
                return
            ino.nlookup -= n
            if ino.nlookup <= 0:
                del self._inodes[nodeid]
                if self._by_key.get(ino.key) is ino:
                    del self._by_key[ino.key]
                os.close(ino.fd)

    def _batch_forget(self, data: bytes) -> None:
        (count, _) = BATCH_FORGET_IN.unpack_from(data, IN_HEADER.size)
        off = IN_HEADER.size + BATCH_FORGET_IN.size
        count = min(count, (len(data) - off) // FORGET_ONE.size)
        for nodeid, n in FORGET_ONE.iter_unpack(data[off:off + count * FORGET_ONE.size]):
            self._forget(nodeid, n)

    def _forget_all(self) -> None:
        with self._lock:
            for fh in list(self._handles):
                os.close(self._handles.pop(fh).fd)
            for nodeid, ino in list(self._inodes.items()):
                if nodeid != FUSE_ROOT_ID:
                    os.close(ino.fd)
            self._inodes = {FUSE_ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}

    # --- replies ----------------------------------------------------------------------------

    def _attr(self, st: os.stat_result) -> bytes:
        return ATTR.pack(st.st_ino, st.st_size, st.st_blocks, int(st.st_atime_ns // 10**9),
                         int(st.st_mtime_ns // 10**9), int(st.st_ctime_ns // 10**9), st.st_atime_ns % 10**9,
                         st.st_mtime_ns % 10**9, st.st_ctime_ns % 10**9, st.st_mode, st.st_nlink,
                         st.st_uid, st.st_gid, _encode_dev(st.st_rdev), st.st_blksize, 0)

    def _entry(self, ino: Inode, st: os.stat_result) -> bytes:
        s, ns = self._valid
        return ENTRY_OUT.pack(ino.nodeid, 0, s, s, ns, ns) + self._attr(st)

    def _lookup_entry(self, parent: Inode, name: str) -> bytes:
        fd = self._open_beneath(parent, name)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._entry(self._add(fd, st), st)

    def _writable(self) -> None:
        if self.read_only:
            raise _err(errno.EROFS)

    def _owner(self, hdr: tuple[int, ...], dirfd: int, name: str) -> None:
        """Give a new entry to the guest caller (when we may chown)."""
        uid, gid = hdr[4], hdr[5]
        if self.uid == 0 and (uid, gid) != (self.uid, self.gid):
            os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)

    # --- operations ---------------------------------------------------------------------------

    def _init(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(args)
        if major != FUSE_KERNEL_VERSION:
            log.warning("fs: FUSE major version %d unsupported", major)
            return INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        want = (ASYNC_READ | POSIX_LOCKS | ATOMIC_O_TRUNC | BIG_WRITES | FLOCK_LOCKS | AUTO_INVAL_DATA
                | DO_READDIRPLUS | READDIRPLUS_AUTO | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS
                | HANDLE_KILLPRIV_V2)
        if self.writeback and not self.read_only and cache_uses_page_cache(self.cache):
            want |= WRITEBACK_CACHE
        agreed = flags & want
        self._wb = bool(agreed & WRITEBACK_CACHE)
        self._forget_all()
        max_pages = max(1, self.max_write // 4096)
        log.info("fs: FUSE %d.%d, flags %#x agreed %#x", major, minor, flags, agreed)
        return INIT_OUT.pack(FUSE_KERNEL_VERSION, min(minor, FUSE_KERNEL_MINOR_VERSION), max_readahead, agreed,
                             64, 48, self.max_write, 1, min(max_pages, 0xFFFF), 0, 0)

    def _destroy(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._forget_all()

    def _lookup(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        try:
            return self._lookup_entry(self._dir(hdr[3]), _split_name(args))
        except FileNotFoundError:
            if not self.timeout:
                raise
            # nodeid 0: "no such entry", which the guest may cache as long as a positive one
            s, ns = self._valid
            return ENTRY_OUT.pack(0, 0, s, s, ns, ns) + bytes(ATTR.size)

    def _getattr(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        flags, _, fh = GETATTR_IN.unpack_from(args) if len(args) >= GETATTR_IN.size else (0, 0, 0)
        if flags & GETATTR_FH and fh in self._handles:
            st = os.fstat(self._handles[fh].fd)
        else:
            st = os.fstat(self._inode(hdr[3]).fd)
        s, ns = self._valid
        return ATTR_OUT.pack(s, ns, 0) + self._attr(st)

    def _setattr(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        self._writable()
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode, _,
         uid, gid, _) = SETATTR_IN.unpack_from(args)
        ino = self._inode(hdr[3])
        is_link = stat.S_ISLNK(ino.mode)
        handle = self._handles.get(fh) if valid & FATTR_FH else None
        if valid & FATTR_MODE:
            if is_link:
                raise _err(errno.EOPNOTSUPP)
            if handle is not None:
                os.fchmod(handle.fd, stat.S_IMODE(mode))
            else:
                os.chmod(_proc(ino.fd), stat.S_IMODE(mode))
        if valid & (FATTR_UID | FATTR_GID):
            u = uid if valid & FATTR_UID else -1
            g = gid if valid & FATTR_GID else -1
            _check(_libc.fchownat(ino.fd, b"", u, g, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
        if valid & FATTR_SIZE:
            if handle is not None:
                os.ftruncate(handle.fd, size)
                if valid & FATTR_KILL_SUIDGID:
                    self._kill_suidgid(handle.fd)
            else:
                if not stat.S_ISREG(ino.mode):
                    raise _err(errno.EINVAL if not stat.S_ISDIR(ino.mode) else errno.EISDIR)
                fd = os.open(_proc(ino.fd), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, size)
                    if valid & FATTR_KILL_SUIDGID:
                        self._kill_suidgid(fd)
                finally:
                    os.close(fd)
        if valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW):
            if is_link:
                raise _err(errno.EOPNOTSUPP)
            times = (_Timespec * 2)()
            for i, (bit, now, sec, nsec) in enumerate(((FATTR_ATIME, FATTR_ATIME_NOW, atime, atimens),
                                                      (FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtimens))):
                if valid & now:
                    times[i] = _Timespec(0, UTIME_NOW)
                elif valid & bit:
                    times[i] = _Timespec(sec, nsec)
                else:
                    times[i] = _Timespec(0, UTIME_OMIT)
            _check(_libc.utimensat(AT_FDCWD, _proc(ino.fd).encode(), times, 0))
        st = os.fstat(ino.fd)
        s, ns = self._valid
        return ATTR_OUT.pack(s, ns, 0) + self._attr(st)

    def _readlink(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        ino = self._inode(hdr[3])
        if not stat.S_ISLNK(ino.mode):
            raise _err(errno.EINVAL)
        return os.fsencode(os.readlink("", dir_fd=ino.fd))

    def _symlink(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        self._writable()
        parent = self._dir(hdr[3])
        name, target = _two_names(args)
        if name in (".", ".."):
            raise _err(errno.EINVAL)
        os.symlink(target, name, dir_fd=parent.fd)  # stored as given: the guest resolves it
        self._owner(hdr, parent.fd, name)
        return self._lookup_entry(parent, name)

    def _mknod(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        self._writable()
        mode, _rdev, umask, _ = MKNOD_IN.unpack_from(args)
        parent = self._dir(hdr[3])
        name = _new_name(args[MKNOD_IN.size:])
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EPERM)  # no device nodes on the host
        os.mknod(name, kind | (stat.S_IMODE(mode) & ~umask), 0, dir_fd=parent.fd)
        self._owner(hdr, parent.fd, name)
        return self._lookup_entry(parent, name)

    def _mkdir(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        self._writable()
        mode, umask = MKDIR_IN.unpack_from(args)
        parent = self._dir(hdr[3])
        name = _new_name(args[MKDIR_IN.size:])
        os.mkdir(name, stat.S_IMODE(mode) & ~umask, dir_fd=parent.fd)
        self._owner(hdr, parent.fd, name)
        return self._lookup_entry(parent, name)

    def _unlink(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._writable()
        parent = self._dir(hdr[3])
        os.unlink(_new_name(args), dir_fd=parent.fd)

    def _rmdir(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._writable()
        parent = self._dir(hdr[3])
        os.rmdir(_new_name(args), dir_fd=parent.fd)

    def _do_rename(self, olddir: int, newdir: int, names: bytes, flags: int) -> None:
        self._writable()
        src, dst = self._dir(olddir), self._dir(newdir)
        old, new = _two_names(names)
        if new in (".", "..") or old in (".", "..") or not new or "/" in new:
            raise _err(errno.EINVAL)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL)  # RENAME_WHITEOUT makes a device node: refused
        if flags:
            _check(_libc.renameat2(src.fd, os.fsencode(old), dst.fd, os.fsencode(new), flags))
        else:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)

    def _rename(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        (newdir,) = RENAME_IN.unpack_from(args)
        self._do_rename(hdr[3], newdir, args[RENAME_IN.size:], 0)

    def _rename2(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        newdir, flags, _ = RENAME2_IN.unpack_from(args)
        self._do_rename(hdr[3], newdir, args[RENAME2_IN.size:], flags)

    def _link(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        self._writable()
        (old,) = LINK_IN.unpack_from(args)
        src = self._inode(old)  # only an inode already in the table: nothing outside can be linked
        parent = self._dir(hdr[3])
        name = _new_name(args[LINK_IN.size:])
        if stat.S_ISDIR(src.mode):
            raise _err(errno.EPERM)
        _check(_libc.linkat(src.fd, b"", parent.fd, os.fsencode(name), AT_EMPTY_PATH))
        return self._lookup_entry(parent, name)

    def _open_inode(self, ino: Inode, flags: int) -> int:
        """A real fd for a regular file or directory inode (never a symlink or device)."""
        if stat.S_ISLNK(ino.mode):
            raise _err(errno.ELOOP)
        if not (stat.S_ISREG(ino.mode) or stat.S_ISDIR(ino.mode)):
            raise _err(errno.EACCES)
        if self.read_only and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise _err(errno.EROFS)
        fd = os.open(_proc(ino.fd), self._host_flags(flags) | os.O_CLOEXEC)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ino.key:  # cannot happen with a /proc re-open; checked anyway
            os.close(fd)
            raise _err(errno.EACCES)
        return fd

    def _host_flags(self, flags: int) -> int:
        """The guest's open flags as the host file is opened with them. With the
        guest's write-back cache the guest may read a file it opened write-only
        (to fill a page) and it places appends itself (every WRITE has its offset)."""
        flags &= OPEN_FLAGS_ALLOWED
        if self._wb:
            flags &= ~os.O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    @staticmethod
    def _kill_suidgid(fd: int) -> None:
        """Clear set-user-ID and set-group-ID (the latter only with group execute),
        as a write or truncate by an unprivileged writer would (HANDLE_KILLPRIV_V2)."""
        mode = os.fstat(fd).st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            os.fchmod(fd, stat.S_IMODE(mode) & ~kill)

    def _new_handle(self, fd: int, nodeid: int, is_dir: bool = False) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(fd, nodeid, is_dir)
        return fh

    def _open(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        flags, open_flags = OPEN_IN.unpack_from(args)
        ino = self._inode(hdr[3])
        if stat.S_ISDIR(ino.mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _err(errno.EISDIR)
        fd = self._open_inode(ino, flags)
        if open_flags & OPEN_KILL_SUIDGID and flags & os.O_TRUNC:
            self._kill_suidgid(fd)
        return OPEN_OUT.pack(self._new_handle(fd, ino.nodeid), self._open_flags, 0)

    def _create(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        self._writable()
        flags, mode, umask, _ = CREATE_IN.unpack_from(args)
        parent = self._dir(hdr[3])
        name = _new_name(args[CREATE_IN.size:])
        oflags = self._host_flags(flags) | os.O_NOFOLLOW | os.O_CLOEXEC
        created = True
        try:
            fd = os.open(name, oflags | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode) & ~umask, dir_fd=parent.fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            created = False  # the host has it already (the guest did not know): open it as it is
            fd = os.open(name, oflags, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.EACCES)
            if created and self.uid == 0 and (hdr[4], hdr[5]) != (self.uid, self.gid):
                os.fchown(fd, hdr[4], hdr[5])
                st = os.fstat(fd)
            pfd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        ino = self._add(pfd, st)
        fh = self._new_handle(fd, ino.nodeid)
        return self._entry(ino, st) + OPEN_OUT.pack(fh, self._open_flags, 0)

    def _flush(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        # Nothing to do at close(): data is on the host once WRITE answers and
        # locks are the open file's (released by RELEASE). ENOSYS tells the
        # guest so, once: it sends no more FLUSHes (a round trip per close saved).
        raise _err(errno.ENOSYS)

    def _release(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        fh, _flags, rflags, _ = RELEASE_IN.unpack_from(args)
        with self._lock:
            h = self._handles.pop(fh, None)
        if h is None:
            raise _err(errno.EBADF)
        if rflags & RELEASE_FLOCK_UNLOCK:
            try:
                fcntl.flock(h.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        os.close(h.fd)

    def _fsync(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        fh, flags, _ = FSYNC_IN.unpack_from(args)
        h = self._handle(fh)
        if flags & FSYNC_FDATASYNC:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)

    def _syncfs(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        fd = os.open(_proc(self.root.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _check(_libc.syncfs(fd))
        finally:
            os.close(fd)

    def _read(self, hdr: tuple[int, ...], head: bytes, chain: Chain) -> int:
        fh, offset, size, *_ = READ_IN.unpack_from(head, IN_HEADER.size)
        unique = hdr[2]
        try:
            h = self._handle(fh)
            size = min(size, chain.writable_len - OUT_HEADER.size)
            n = -1
            if isinstance(chain, IovChain):
                iov = _iov_span(chain, chain.nr, len(chain.lens), OUT_HEADER.size, size)
                if iov is not None:
                    n = _check(_libc.preadv(h.fd, ctypes.addressof(iov[0]), iov[1], offset))
            if n < 0:
                views = _views_from(chain.writable, OUT_HEADER.size, size)
                n = os.preadv(h.fd, views, offset) if views else 0
        except OSError as e:
            self.counters["errors"] += 1
            return chain.write(OUT_HEADER.pack(OUT_HEADER.size, -(e.errno or errno.EIO), unique))
        _put(chain, OUT_HEADER.pack(OUT_HEADER.size + n, 0, unique))
        self.counters["reads"] += 1
        self.counters["read_bytes"] += n
        return OUT_HEADER.size + n

    def _write(self, hdr: tuple[int, ...], head: bytes, chain: Chain) -> int:
        unique = hdr[2]
        try:
            self._writable()
            fh, offset, size, write_flags, *_ = WRITE_IN.unpack_from(head, IN_HEADER.size)
            h = self._handle(fh)
            if write_flags & WRITE_KILL_SUIDGID:
                self._kill_suidgid(h.fd)
            start = IN_HEADER.size + WRITE_IN.size
            size = min(size, chain.readable_len - start)
            n = 0
            if isinstance(chain, IovChain):
                iov = _iov_span(chain, 0, chain.nr, start, size)
                if iov is not None:
                    n = _check(_libc.pwritev(h.fd, ctypes.addressof(iov[0]), iov[1], offset))
            views = _views_from(chain.readable, start + n, size - n) if n < size else []
            while views:
                done = os.pwritev(h.fd, views, offset + n)
                n += done
                if n >= size or done == 0:
                    break
                views = _views_from(views, done, size - n)
        except OSError as e:
            self.counters["errors"] += 1
            return chain.write(OUT_HEADER.pack(OUT_HEADER.size, -(e.errno or errno.EIO), unique))
        except struct.error:
            return chain.write(OUT_HEADER.pack(OUT_HEADER.size, -errno.EINVAL, unique))
        self.counters["writes"] += 1
        self.counters["write_bytes"] += n
        return _put(chain, OUT_HEADER.pack(OUT_HEADER.size + WRITE_OUT.size, 0, unique) + WRITE_OUT.pack(n, 0))

    def _opendir(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        ino = self._dir(hdr[3])
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ino.fd)
        return OPEN_OUT.pack(self._new_handle(fd, ino.nodeid, is_dir=True), 0, 0)

    def _listing(self, h: Handle, offset: int) -> list[tuple[str, int, int]]:
        if h.entries is None or offset == 0:
            st = os.fstat(h.fd)
            entries = [(".", st.st_ino, stat.S_IFDIR >> 12), ("..", st.st_ino, stat.S_IFDIR >> 12)]
            with os.scandir(h.fd) as it:
                for e in it:
                    try:
                        t = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode) >> 12
                    except OSError:
                        continue
                    entries.append((e.name, e.inode(), t))
            h.entries = entries
        return h.entries

    def _readdir(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        return self._dirents(args, plus=False)

    def _readdirplus(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        return self._dirents(args, plus=True)

    def _dirents(self, args: bytes, plus: bool) -> bytes:
        fh, offset, size, *_ = READ_IN.unpack_from(args)
        h = self._handle(fh)
        if not h.is_dir:
            raise _err(errno.ENOTDIR)
        entries = self._listing(h, offset)
        parent = self._dir(h.nodeid)
        out: list[bytes] = []
        used = 0
        zero_entry = bytes(ENTRY_OUT.size + ATTR.size)
        for i in range(offset, len(entries)):
            name, ino, dtype = entries[i]
            raw = os.fsencode(name)
            rec = DIRENT.size + len(raw)
            rec_padded = (rec + 7) & ~7
            need = rec_padded + (ENTRY_OUT.size + ATTR.size if plus else 0)
            if used + need > size:
                break
            if plus:
                if name in (".", ".."):
                    entry = zero_entry
                else:
                    try:
                        entry = self._lookup_entry(parent, name)
                    except OSError:
                        continue  # gone since the listing
                    ino = ATTR.unpack_from(entry, ENTRY_OUT.size)[0]
                out.append(entry)
            out.append(DIRENT.pack(ino, i + 1, len(raw), dtype) + raw + bytes(rec_padded - rec))
            used += need
        return b"".join(out)

    def _statfs(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        ino = self._inode(hdr[3]) if hdr[3] in self._inodes else self.root
        s = os.fstatvfs(ino.fd)
        return STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                               s.f_namemax, s.f_frsize, 0)

    def _access(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        mask, _ = ACCESS_IN.unpack_from(args)
        ino = self._inode(hdr[3])
        if mask & os.W_OK and self.read_only:
            raise _err(errno.EROFS)
        if stat.S_ISLNK(ino.mode):
            return
        if not os.access(_proc(ino.fd), mask):
            raise _err(errno.EACCES)

    # --- xattrs -------------------------------------------------------------------------------

    def _xattr_path(self, nodeid: int) -> str:
        if not self.xattr:
            raise _err(errno.ENOSYS)
        ino = self._inode(nodeid)
        if not (stat.S_ISREG(ino.mode) or stat.S_ISDIR(ino.mode)):
            raise _err(errno.EPERM if stat.S_ISLNK(ino.mode) else errno.EOPNOTSUPP)
        return _proc(ino.fd)

    def _setxattr(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._writable()
        size, flags = SETXATTR_IN.unpack_from(args)
        rest = args[SETXATTR_IN.size:]
        end = rest.find(b"\0")
        if end <= 0:
            raise _err(errno.EINVAL)
        name = rest[:end].decode("utf-8", "surrogateescape")
        if not name.startswith("user."):
            raise _err(errno.EPERM)
        value = rest[end + 1:end + 1 + size]
        os.setxattr(self._xattr_path(hdr[3]), name, value, flags)

    def _getxattr(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        size, _ = GETXATTR_IN.unpack_from(args)
        name = _split_xattr_name(args[GETXATTR_IN.size:])
        value = os.getxattr(self._xattr_path(hdr[3]), name)
        if size == 0:
            return GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise _err(errno.ERANGE)
        return value

    def _listxattr(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        size, _ = GETXATTR_IN.unpack_from(args)
        names = os.listxattr(self._xattr_path(hdr[3]))
        data = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names)
        if size == 0:
            return GETXATTR_OUT.pack(len(data), 0)
        if len(data) > size:
            raise _err(errno.ERANGE)
        return data

    def _removexattr(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._writable()
        name = _split_xattr_name(args)
        if not name.startswith("user."):
            raise _err(errno.EPERM)
        os.removexattr(self._xattr_path(hdr[3]), name)

    # --- locks --------------------------------------------------------------------------------

    def _lk(self, args: bytes) -> tuple[Handle, int, int, int, int]:
        fh, _owner, start, end, typ, _pid, lk_flags, _ = LK_IN.unpack_from(args)
        length = 0 if end >= OFFSET_MAX else end - start + 1
        return self._handle(fh), start, length, typ, lk_flags

    def _getlk(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        h, start, length, typ, _ = self._lk(args)
        res = fcntl.fcntl(h.fd, F_OFD_GETLK, FLOCK.pack(typ, os.SEEK_SET, start, length, 0))
        rtyp, _, rstart, rlen, _ = FLOCK.unpack(res)
        if rtyp == fcntl.F_UNLCK:
            return LK_OUT.pack(start, OFFSET_MAX if length == 0 else start + length - 1, fcntl.F_UNLCK, 0)
        return LK_OUT.pack(rstart, OFFSET_MAX if rlen == 0 else rstart + rlen - 1, rtyp, 0)

    def _setlk(self, hdr: tuple[int, ...], args: bytes, chain: Chain, wait: bool = False) -> None:
        h, start, length, typ, lk_flags = self._lk(args)
        if lk_flags & LK_FLOCK:
            op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(typ, fcntl.LOCK_UN)

            def attempt() -> None:
                fcntl.flock(h.fd, op | (fcntl.LOCK_NB if op != fcntl.LOCK_UN else 0))
        else:
            req = FLOCK.pack(typ, os.SEEK_SET, start, length, 0)

            def attempt() -> None:
                fcntl.fcntl(h.fd, F_OFD_SETLK, req)
        deadline = time.monotonic() + (self.lock_wait if wait else 0)
        delay = 0.001
        while True:
            try:
                attempt()
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise _err(errno.EAGAIN) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _setlkw(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._setlk(hdr, args, chain, wait=True)

    # --- the rest -----------------------------------------------------------------------------

    def _fallocate(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> None:
        self._writable()
        fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(args)
        h = self._handle(fh)
        _check(_libc.fallocate(h.fd, ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)))

    def _lseek(self, hdr: tuple[int, ...], args: bytes, chain: Chain) -> bytes:
        fh, offset, whence, _ = LSEEK_IN.unpack_from(args)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise _err(errno.EINVAL)
        return LSEEK_OUT.pack(os.lseek(self._handle(fh).fd, offset, whence))


def _split_xattr_name(data: bytes) -> str:
    end = data.find(b"\0")
    raw = data if end < 0 else data[:end]
    if not raw:
        raise _err(errno.EINVAL)
    return raw.decode("utf-8", "surrogateescape")


def _head(chain: Chain, limit: int | None = None) -> bytes:
    """The first `limit` device-readable bytes (all without a limit). An
    array-form chain is read segment by segment, so that the views of its
    other segments (a READ's 256 pages) are never made."""
    if not isinstance(chain, IovChain):
        return chain.read(limit)
    parts = []
    left = chain.readable_len if limit is None else min(limit, chain.readable_len)
    i = 0
    while left > 0 and i < chain.nr:
        v = chain.view(i, 0, left)
        parts.append(v)
        left -= len(v)
        i += 1
    data = b"".join(parts)
    c = chain.counter
    if c is not None:
        c.reads += len(parts)
        c.bytes_read += len(data)
    return data


def _put(chain: Chain, data: bytes) -> int:
    """`chain.write(data)`, into the first device-writable segment of an
    array-form chain directly when it has room (its other views not made)."""
    if isinstance(chain, IovChain) and chain.nr < len(chain.lens) and chain.lens[chain.nr] >= len(data):
        chain.view(chain.nr, 0, len(data))[:] = data
        c = chain.counter
        if c is not None:
            c.writes += 1
            c.bytes_written += len(data)
        return len(data)
    return chain.write(data)


def _views_from(views: list[memoryview], skip: int, size: int) -> list[memoryview]:
    """The bytes [skip, skip + size) of a list of buffers, as views (whole
    buffers reused, only the first and last sliced)."""
    out: list[memoryview] = []
    if size <= 0:
        return out
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        if skip:
            v = v[skip:]
            n -= skip
            skip = 0
        if n >= size:
            out.append(v if n == size else v[:size])
            return out
        out.append(v)
        size -= n
    return out


def _iov_span(chain: IovChain, first: int, end: int, skip: int, size: int) -> tuple[ctypes.Array[ctypes.c_char], int] | None:
    """The `struct iovec[]` of bytes [skip, skip + size) of segments first..end
    of an array-form chain, for preadv/pwritev without a view per page; None
    when `skip` does not fall on a segment boundary or the span is too long
    (the caller takes the general path). Sums and searches the segment
    lengths with builtins (a 1 MiB READ has 256 of them)."""
    lens = chain.lens
    i = first
    while i < end and skip >= lens[i] and skip:
        skip -= lens[i]
        i += 1
    if skip or i >= end or size <= 0:
        return None
    total = sum(lens[i:end])
    if total - size < lens[end - 1]:  # the usual case: the buffers are the span (the last one maybe longer)
        j = end
    else:
        sums = list(accumulate(lens[i:end]))
        k = bisect_left(sums, size)
        j = i + k + 1
        total = sums[k]
    if total < size or j - i > IOV_MAX:
        return None
    seg = bytearray(chain.iov[16 * i:16 * j])
    if total > size:  # the last buffer is longer than needed: shorten its iovec
        struct.pack_into("<Q", seg, len(seg) - 8, lens[j - 1] - (total - size))
    return (ctypes.c_char * len(seg)).from_buffer(seg), j - i


__all__ = ["FS_CONFIG", "FsDevice", "FsError", "openat2"]
