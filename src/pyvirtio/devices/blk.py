"""virtio-blk over vhost-user, backed by an image file or a block device.

Requests (virtio 1.2 5.2.6): IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES
(with UNMAP); anything else is answered UNSUPP. Each request is a header
(type u32, reserved u32, sector u64) in the device-readable part, data, and
a status byte: the last byte of the device-writable part. Framing is not
assumed (VERSION_1 implies ANY_LAYOUT): the header may span descriptors, the
data starts right after it, wherever that is.

Data moves with preadv(2) / pwritev2(2) straight between the file and guest
memory (zero-copy). A long request (an indirect table of 32 segments or
more: 128 KiB and up) arrives as an `IovChain`, whose `struct iovec[]` the
engine builds from the table in a few whole-table operations, and goes to
the kernel as is (ctypes; the GIL is released for the call). Shorter ones
use `os.preadv` / `os.pwritev` on the chain's views. A queue's thread
parses and dispatches: a read the host page cache holds runs right there
(preadv2 with RWF_NOWAIT: it cannot block), as does the last request of a
burst (nothing behind it in the ring: no hand-off, the lowest latency for a
queue-depth-1 guest); parsing and those reads are the engine's blk batch
operation (`pyvirtio.queue.blkreq`, compiled with it). Anything else goes
to a small pool of threads shared by the queues, so that slow requests
overlap. A burst's completions are
published together (one interrupt decision), pool completions as they
arrive. Chains are taken one at a time with a pool, so a request's I/O
starts while the next chain is being built.

A bad request gets a status, never an exception: a header shorter than 16
bytes, data not a whole number of sectors, a sector range past the end (or
overflowing), a write to a read-only disk, a DISCARD/WRITE_ZEROES list that
breaks the advertised limits all complete with IOERR; an unknown type or a
reserved flag with UNSUPP; a chain with no writable byte (no room for a
status) is returned with length 0. The queue keeps working.

FLUSH means `fdatasync` done before the status is written. The write cache
is the driver's choice through CONFIG_WCE (config byte 32): in writethrough
mode every write is `RWF_DSYNC` (durable when it completes).

Online resize: the image grows while the guest runs. `BlkDevice.resize()`
re-reads the image's size (an operator grew it: `truncate -s +64M`,
`lvextend`) or grows the file itself (`resize(size)`); the capacity in the
config space follows and `config_changed()` tells the driver (vhost-user:
CONFIG_CHANGE_MSG; Linux then logs "capacity change"). Shrinking is refused:
the guest may have data past the new end.

With the INFLIGHT_SHMFD protocol feature (offered), the back-end records
every request in the front-end's inflight buffer (`pyvirtio.vhost_user.
inflight`), so a back-end killed mid-write and restarted resubmits exactly
the requests that were in flight, in order, before taking new ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from pyvirtio.queue import Chain
from pyvirtio.queue.blkreq import (
    IOV_MAX,
    IOVEC,
    MAX_DWZ_SECTORS,
    MAX_DWZ_SEG,
    NOWAIT_UNSUPPORTED,
    BlkRequest,
    parse,
    serve,
    serve_read,
)
from pyvirtio.queue.blkreq import (
    libc as _libc,
)
from pyvirtio.queue.blkreq import tail as _tail
from pyvirtio.runtime import Completion, Queue, QueueLoop, Service, VirtioDevice
from pyvirtio.spec import (
    BLK_CONFIG,
    CONFIG_WCE_OFFSET,
    DWZ_SEG,
    DWZ_UNMAP,
    ID_BYTES,
    REQ_HDR,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkFeature,
    Feature,
    features_str,
)

log = logging.getLogger(__name__)


# fallocate(2) modes and block-device ioctls
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272

_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


_preadv = _libc.preadv
_preadv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)
_preadv.restype = ctypes.c_ssize_t
_pwritev2 = _libc.pwritev2
_pwritev2.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int)
_pwritev2.restype = ctypes.c_ssize_t


def _iov_transfer(write: bool, fd: int, iov: bytes, offset: int, total: int, flags: int = 0) -> None:
    """preadv(2)/pwritev2(2) of `iov` (a `struct iovec[]` as bytes, see
    `IovChain`); resumes short transfers; EIO if the file ends early. ctypes
    releases the GIL for the call."""
    while True:
        cnt = len(iov) >> 4
        got = _pwritev2(fd, iov, cnt, offset, flags) if write else _preadv(fd, iov, cnt, offset)
        if got == total:
            return
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        if got == 0:
            raise OSError(errno.EIO, f"short transfer at byte {offset} (file shorter than the disk?)")
        # short (rare): skip the `got` bytes done
        skip = got
        for i, (base, n) in enumerate(IOVEC.iter_unpack(iov)):
            if skip < n:
                iov = IOVEC.pack(base + skip, n - skip) + iov[16 * (i + 1):]
                break
            skip -= n
        offset += got
        total -= got


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (`os.posix_fallocate` has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _transfer(op: Callable[..., int], fd: int, views: list[memoryview], offset: int, total: int,
              *flags: int) -> None:
    """`os.preadv` / `os.pwritev` of all `total` bytes of `views` at `offset`:
    in IOV_MAX chunks, resuming short transfers; EIO if the file ends early."""
    if len(views) <= IOV_MAX:
        got = op(fd, views, offset, *flags)
        if got == total:
            return
    else:
        got = 0
    done = got
    while done < total:
        rest = _tail(views, done)[:IOV_MAX]
        n = op(fd, rest, offset + done, *flags)
        if n == 0:
            raise OSError(errno.EIO, f"short transfer at byte {offset + done} (file shorter than the disk?)")
        done += n


class ResizeError(ValueError):
    """A resize the device refuses (shrinking, a size it cannot set)."""


@dataclass(slots=True, frozen=True)
class ResizeResult:
    """What `BlkDevice.resize` did: capacities in 512-byte sectors, and the
    transport's receipt for the config-change notification (None when
    nothing changed or no transport hosts the device)."""

    old_capacity: int
    capacity: int
    notice: object = None

    @property
    def changed(self) -> bool:
        return self.capacity != self.old_capacity


@dataclass(slots=True)
class BlkStats:
    """Request counts for the stats JSON."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    get_ids: int = 0
    discards: int = 0
    write_zeroes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    ioerr: int = 0        # requests answered IOERR (bad requests and host I/O errors)
    unsupp: int = 0       # requests answered UNSUPP
    no_status: int = 0    # chains without a writable byte, returned with length 0
    inline: int = 0       # requests run on the queue thread (page-cache hits, buffered writes, the last of a burst)
    pooled: int = 0       # requests run in the I/O pool

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: a parsed request (the engine's `BlkRequest`)
_Req = BlkRequest


class IOPool:
    """A few threads running requests; each result goes back to its queue's loop."""

    def __init__(self, threads: int, device: BlkDevice) -> None:
        self._q: queue.SimpleQueue[_Req | None] = queue.SimpleQueue()
        self._device = device
        self._threads = [threading.Thread(target=self._run, name=f"blk-io{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, req: _Req) -> None:
        self._q.put(req)

    def _run(self) -> None:
        get = self._q.get
        execute = self._device.execute
        while True:
            req = get()
            if req is None:
                return
            written = execute(req)
            q = req.queue
            assert q is not None
            q.deliver(req.chain, written)

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(10)


# --- the per-queue service (the runtime's loop runs it) ------------------------------------


class _BlkService(Service):
    """Takes requests, runs them (inline or in the pool), and lets the loop
    publish a burst's completions together. The loop finishes the requests
    in flight before a ring stops."""

    def __init__(self, queue: Queue, device: BlkDevice) -> None:
        super().__init__(queue)
        self.device = device
        self.batch = device.batch
        self.publish_at = device.batch
        self.max_out = device.max_outstanding
        self.pooled = device.pool is not None
        self._done: list[Completion] = []  # handle()'s, for _run

    def take(self) -> int:
        q = self.queue
        room = self.max_out - q.outstanding
        if not q.enabled or room <= 0:
            return 0
        # With a pool, one chain at a time: its I/O starts while the next
        # chain is being taken (chain building is the costly part).
        return 1 if self.pooled else min(self.batch, room)

    def handle(self, chains: list[Chain], done: list[Completion]) -> None:
        # The engine parses the batch and serves page-cache reads itself
        # (`pyvirtio.queue.blkreq.serve`); the rest comes back to `_run`.
        dev = self.device
        self._done = done
        serve(dev, self.queue.counters, chains, done, self._run, dev.pool is not None and dev.cached_reads())

    def _run(self, chain: Chain, r: _Req) -> None:
        dev = self.device
        done = self._done
        pool = dev.pool
        if pool is not None:
            # A buffered write while writes are fast runs here, as does the
            # last request of a burst (nothing behind it in the ring: no
            # hand-off, the lowest latency at queue depth 1); a read the
            # page cache held already did (`serve`). Anything else goes to
            # the pool, so that slow requests overlap.
            w = dev.execute_cached(r) if r.kind == T_OUT else None
            if w is not None:
                dev.counts.inline += 1
                done.append((chain, w))
                return
            q = self.queue
            if q.vq.has_work():
                dev.counts.pooled += 1
                q.defer()
                r.queue = q
                pool.submit(r)
                return
        dev.counts.inline += 1
        done.append((chain, dev.execute(r)))


# --- the device -----------------------------------------------------------------------


class BlkDevice(VirtioDevice):
    """virtio-blk over the file (or block device) at `path`.

    - `num_queues`: request queues offered (GET_QUEUE_NUM; QEMU's
      vhost-user-blk-pci asks one per vCPU by default);
    - `io_threads`: the I/O pool (0: every request runs on its queue's thread);
    - `direct`: O_DIRECT data I/O (falls back to buffered I/O for a request
      whose buffers the host refuses);
    - `seg_max`: largest data segments per request (must stay <= the ring
      size - 2: the queue engine bounds a chain by the ring size);
    - `inject_latency`: seconds each pooled or inline request sleeps around
      its I/O (half before, half after): a testing aid that keeps requests
      in flight long enough to be caught by a crash.
    """

    name = "blk"
    #: an inline buffered write slower than this (seconds) was throttled or
    #: waited for the disk: writes then go to the pool for SLOW_WRITE_HOLD
    SLOW_WRITE = 0.01
    SLOW_WRITE_HOLD = 1.0

    def __init__(self, path: str, *, read_only: bool = False, num_queues: int = 8, direct: bool = False,
                 io_threads: int = 4, seg_max: int = 126, size_max: int = 1 << 20, serial: str | None = None,
                 logical_block_size: int = SECTOR, physical_block_size: int = 4096, batch: int = 64,
                 max_outstanding: int | None = None, inject_latency: float = 0.0) -> None:
        if not 1 <= num_queues <= 256:
            raise ValueError(f"queues {num_queues} is not in 1..256")
        if not 1 <= seg_max <= 32766:
            raise ValueError(f"seg-max {seg_max} is not in 1..32766")
        if logical_block_size < SECTOR or logical_block_size & (logical_block_size - 1):
            raise ValueError("the logical block size must be a power of two >= 512")
        if physical_block_size < logical_block_size or physical_block_size & (physical_block_size - 1):
            raise ValueError("the physical block size must be a power of two >= the logical one")
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        self.dfd = -1
        try:
            st = os.fstat(self.fd)
            self.is_blockdev = stat.S_ISBLK(st.st_mode)
            if not (self.is_blockdev or stat.S_ISREG(st.st_mode)):
                raise ValueError(f"{path} is neither a regular file nor a block device")
            if self.is_blockdev:
                buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
                size = struct.unpack("<Q", buf)[0]
            else:
                size = st.st_size
            if direct:
                self.dfd = os.open(path, flags | os.O_DIRECT)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size - size % SECTOR
        self.capacity = self.size // SECTOR
        self.direct = direct
        self.seg_max = seg_max
        self.size_max = size_max
        self.logical_block_size = logical_block_size
        self.physical_block_size = physical_block_size
        self.serial = (serial if serial is not None else os.path.basename(path)).encode()[:ID_BYTES]
        self.num_queues = num_queues
        self.queue_num = num_queues
        self.batch = batch
        self.io_threads = io_threads
        self.max_outstanding = max_outstanding or max(8, 4 * io_threads)
        self.inject_latency = inject_latency
        feats = (Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_PACKED | Feature.RING_INDIRECT_DESC
                 | BlkFeature.SEG_MAX | BlkFeature.SIZE_MAX | BlkFeature.BLK_SIZE | BlkFeature.TOPOLOGY
                 | BlkFeature.FLUSH | BlkFeature.CONFIG_WCE | BlkFeature.MQ)
        if read_only:
            feats |= BlkFeature.RO
        else:
            feats |= BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
        self.features = int(feats)
        self.multiqueue = True
        self.config_space = True
        self.inflight_tracking = True
        self.negotiated = 0
        self.wce = 1
        self.writethrough = False
        self.counts = BlkStats()
        self.loops: dict[int, QueueLoop] = {}
        self.pool: IOPool | None = IOPool(io_threads, self) if io_threads else None
        self._io_errors_logged = 0
        #: RWF_NOWAIT reads work here (cleared on the first EOPNOTSUPP)
        self._nowait = True
        #: buffered writes go to the pool until then (a write was slow: `execute_cached`)
        self._pool_writes_until = 0.0
        self._resize_lock = threading.Lock()
        self.resizes = 0

    # -- VirtioDevice -------------------------------------------------------------------

    def config(self) -> bytes:
        lbs = self.logical_block_size
        exp = (self.physical_block_size // lbs).bit_length() - 1
        dwz_align = max(1, self.physical_block_size // SECTOR)
        return BLK_CONFIG.pack(
            self.capacity, self.size_max, self.seg_max, 0, 0, 0, lbs,
            exp, 0, self.physical_block_size // lbs, 0,
            self.wce, 0, self.num_queues,
            MAX_DWZ_SECTORS, MAX_DWZ_SEG, dwz_align, MAX_DWZ_SECTORS, MAX_DWZ_SEG, 1,
            0, 0, 0)

    def set_config(self, offset: int, data: bytes, flags: int) -> bool:
        # Only the writeback byte is writable by the driver (5.2.4).
        if offset == CONFIG_WCE_OFFSET and len(data) == 1:
            self.wce = data[0] & 1
            self._update_cache_mode()
            log.info("blk: write cache %s", "writeback" if self.wce else "writethrough")
            return True
        log.warning("blk: SET_CONFIG of %d bytes at %d refused (read-only field)", len(data), offset)
        return False

    def set_features(self, features: int) -> None:
        self.negotiated = features
        self._update_cache_mode()
        log.info("blk: features %s", features_str(features, BlkFeature))

    def _update_cache_mode(self) -> None:
        # Without CONFIG_WCE the mode follows FLUSH: writeback iff FLUSH (5.2.5.1).
        if self.negotiated & BlkFeature.CONFIG_WCE:
            self.writethrough = not self.wce
        else:
            self.writethrough = not self.negotiated & BlkFeature.FLUSH

    def service(self, queue: Queue) -> Service:
        if queue.vq.size < self.seg_max + 2:
            log.warning("blk: ring %d has %d entries but seg-max is %d: requests of more than %d segments "
                        "will break the ring (start with --seg-max %d)", queue.index, queue.vq.size,
                        self.seg_max, queue.vq.size - 2, queue.vq.size - 2)
        return _BlkService(queue, self)

    def reset(self) -> None:
        self.stop_queues()
        self.wce = 1
        self.negotiated = 0
        self._update_cache_mode()

    def close(self) -> None:
        self.reset()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1

    def queue_role(self, index: int) -> str:
        return f"req{index}"

    def stats(self) -> dict[str, Any]:
        return {"image": self.path, "capacity_sectors": self.capacity, "resizes": self.resizes,
                "read_only": self.read_only,
                "direct": self.direct, "io_threads": self.io_threads,
                "write_cache": "writethrough" if self.writethrough else "writeback",
                "negotiated": features_str(self.negotiated, BlkFeature), "requests": self.counts.as_dict()}

    # -- online resize -------------------------------------------------------------------------

    def image_size(self) -> int:
        """The image's size in bytes as the host sees it now."""
        if self.is_blockdev:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        return os.fstat(self.fd).st_size

    def resize(self, size: int | None = None) -> ResizeResult:
        """Grow the disk while the guest runs (thread-safe).

        `size` None: take the image's current size (the operator grew the
        file or the block device). `size` N bytes: grow the file to N first
        (a regular, writable image; N a multiple of the logical block size).
        Raises `ResizeError` for anything that would shrink the disk below
        its current capacity, and `OSError` when the host refuses. When the
        capacity changed, `config_changed()` tells the driver; its receipt
        is in the result.
        """
        with self._resize_lock:
            old = self.capacity
            if size is not None:
                if size < 0 or size % self.logical_block_size:
                    raise ResizeError(f"size {size} is not a multiple of the {self.logical_block_size}-byte "
                                      "logical block size")
                if size < self.size:
                    raise ResizeError(f"shrinking from {self.size} to {size} bytes is refused (the guest may "
                                      "have data past the new end)")
                if self.is_blockdev:
                    raise ResizeError("a block device's size is set by its owner (lvextend, ...): grow it, "
                                      "then resize without a size")
                if self.read_only:
                    raise ResizeError("the image is served read-only: grow it elsewhere, then resize "
                                      "without a size")
                if self.image_size() < size:
                    os.ftruncate(self.fd, size)
                new_size = size
            else:
                now = self.image_size()
                new_size = now - now % SECTOR
                if new_size < self.size:
                    raise ResizeError(f"the image shrank from {self.size} to {now} bytes; the disk keeps "
                                      f"{self.capacity} sectors (shrinking is refused: grow the image back)")
            if new_size == self.size:
                log.info("blk: resize: %s is still %d bytes (%d sectors); nothing to tell", self.path,
                         self.size, self.capacity)
                return ResizeResult(old, old)
            # Growing only: a request checked against the old capacity is still in range.
            self.size = new_size
            self.capacity = new_size // SECTOR
            self.resizes += 1
            log.info("blk: %s resized from %d to %d sectors (%d bytes)", self.path, old, self.capacity, new_size)
            return ResizeResult(old, self.capacity, self.config_changed())

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, chain: Chain) -> _Req | int:
        """Parse one request. Returns the used length when it is already
        answered (bad request, GET_ID, nothing to do), else a `_Req` to
        `execute` (the engine's `pyvirtio.queue.blkreq.parse`)."""
        return parse(chain, self.capacity, self.read_only, self.serial, self.counts)

    def execute(self, req: _Req) -> int:
        """Do the I/O of a prepared request, write its status; returns the used
        length. Never raises (a host I/O error is the request's IOERR)."""
        lat = self.inject_latency
        if lat:
            time.sleep(lat / 2)
        try:
            kind = req.kind
            if kind == T_IN:
                self._read(req)
                self.counts.reads += 1
                self.counts.bytes_read += req.nbytes
            elif kind == T_OUT:
                self._write(req)
                self.counts.writes += 1
                self.counts.bytes_written += req.nbytes
            elif kind == T_FLUSH:
                os.fdatasync(self.fd)
                self.counts.flushes += 1
            else:
                self._discard_or_zero(req)
            s = S_OK
        except Exception as e:  # a host I/O failure: the request's IOERR, never the worker's death
            self._io_errors_logged += 1
            if self._io_errors_logged <= 10 or self._io_errors_logged % 1000 == 0:
                log.warning("blk: request type %d at byte %d failed: %s (%d so far)", req.kind, req.offset, e,
                            self._io_errors_logged, exc_info=not isinstance(e, OSError))
            self.counts.ioerr += 1
            s = S_IOERR
        if lat:
            time.sleep(lat / 2)
        req.status[0] = s
        return req.written

    def execute_cached(self, req: _Req) -> int | None:
        """A request the host page cache takes without waiting for the disk,
        done here: its used length; None when it may wait (or is neither a
        buffered read nor a buffered write): `execute` it instead.

        - A read is done with preadv2(RWF_NOWAIT), so it fails instead of
          blocking unless the page cache holds all of it.
        - A buffered write lands in the page cache (ext4 refuses
          RWF_NOWAIT for writes, so it is simply done). Handing it to the
          pool costs more CPU than the copy (measured: 898 vs 645 µs per
          MiB written under `bench guest-blk`), but a write can still
          block when the host throttles dirty pages: one that takes longer
          than `SLOW_WRITE` sends writes to the pool for `SLOW_WRITE_HOLD`
          seconds, so that they overlap again while the disk is the limit."""
        if req.kind == T_OUT:
            if self.dfd >= 0 or self.writethrough or self.inject_latency:
                return None
            t = time.monotonic()
            if t < self._pool_writes_until:
                return None
            w = self.execute(req)
            if time.monotonic() - t > self.SLOW_WRITE:
                self._pool_writes_until = time.monotonic() + self.SLOW_WRITE_HOLD
            return w
        if req.kind != T_IN or not self.cached_reads() or not req.nbytes:
            return None
        got = serve_read(self.fd, self.counts, req)
        if got == NOWAIT_UNSUPPORTED:
            self._nowait = False  # this file system cannot: stop asking
        return got if got >= 0 else None  # not all cached: read it all again, blocking

    def cached_reads(self) -> bool:
        """Reads are tried with RWF_NOWAIT first (buffered I/O on a file
        system that takes it, no injected latency)."""
        return self.dfd < 0 and self._nowait and not self.inject_latency

    def _read(self, req: _Req) -> None:
        self._transfer(req, False, 0)

    def _write(self, req: _Req) -> None:
        self._transfer(req, True, os.RWF_DSYNC if self.writethrough else 0)

    def _transfer(self, req: _Req, write: bool, flags: int) -> None:
        """The request's data to or from the file: O_DIRECT first when
        asked for, buffered for a request whose buffers the host refuses."""
        if not req.nbytes:
            return
        for fd in (self.dfd, self.fd) if self.dfd >= 0 else (self.fd,):
            try:
                if req.iov is not None:
                    _iov_transfer(write, fd, req.iov, req.offset, req.nbytes, flags)
                elif write:
                    _transfer(os.pwritev, fd, req.data, req.offset, req.nbytes, *((flags,) if flags else ()))
                else:
                    _transfer(os.preadv, fd, req.data, req.offset, req.nbytes)
                return
            except OSError as e:
                if fd == self.fd or e.errno != errno.EINVAL:
                    raise

    def _discard_or_zero(self, req: _Req) -> None:
        for sector, num, fl in DWZ_SEG.iter_unpack(req.payload):
            off, length = sector * SECTOR, num * SECTOR
            if not length:
                continue
            if req.kind == T_DISCARD:
                self._discard(off, length)
                self.counts.discards += 1
            else:
                self._zero(off, length, bool(fl & DWZ_UNMAP))
                self.counts.write_zeroes += 1
            if self.writethrough:
                os.fdatasync(self.fd)

    def _discard(self, off: int, length: int) -> None:
        # A discard is a hint: a host that cannot deallocate leaves the data.
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", off, length))
            else:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise

    def _zero(self, off: int, length: int, unmap: bool) -> None:
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", off, length))
            else:
                mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
                fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, off, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
        zeros = bytes(min(length, 1 << 20))
        end = off + length
        while off < end:
            n = min(len(zeros), end - off)
            done = os.pwrite(self.fd, memoryview(zeros)[:n], off)
            if done <= 0:
                raise OSError(errno.EIO, "short write while zeroing")
            off += done


__all__ = [
    "BLK_CONFIG",
    "DWZ_SEG",
    "REQ_HDR",
    "S_IOERR",
    "S_OK",
    "S_UNSUPP",
    "T_DISCARD",
    "T_FLUSH",
    "T_GET_ID",
    "T_IN",
    "T_OUT",
    "T_WRITE_ZEROES",
    "BlkDevice",
    "BlkFeature",
    "BlkStats",
    "IOPool",
    "ResizeError",
    "ResizeResult",
    "fallocate",
]
