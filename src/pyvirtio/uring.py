"""A minimal io_uring (Linux 5.1+) through ctypes, for one thread.

Only what a device back-end needs to start a transfer and carry on while
the kernel does it: `submit` one operation (READV / WRITEV / FSYNC) and have
it handed to the kernel at once; `reap` the completions that are there (a
read of the completion ring, no system call); `wait` for at least one. An
eventfd can be registered so that completions wake a `poll` loop that also
watches other fds (a vhost-user worker's wake eventfd).

`IOSQE_ASYNC` (Linux 5.6+) makes the kernel run the operation in its own
worker thread instead of trying it inline first: the copy of a page-cache
read then overlaps whatever the submitting thread does next, with no Python
thread and no GIL hand-off involved.

Not thread-safe: one ring per thread. Everything an operation points to
(the iovec array, the buffers) must stay alive until its completion is
reaped. `Uring.open` raises `OSError` where io_uring is missing or refused
(kernels before 5.6, seccomp profiles, `kernel.io_uring_disabled`): callers
fall back to threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86-64 and aarch64 share the io_uring syscall numbers (they were added to
# every architecture's table at once)
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

OP_NOP = 0
OP_READV = 1
OP_WRITEV = 2
OP_FSYNC = 3
FSYNC_DATASYNC = 1

SQE_ASYNC = 1 << 4
ENTER_GETEVENTS = 1
REGISTER_EVENTFD = 4
FEAT_SINGLE_MMAP = 1 << 0
FEAT_NODROP = 1 << 1

_OFF_SQ_RING = 0
_OFF_CQ_RING = 0x8000000
_OFF_SQES = 0x10000000

# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets
# (8 u32 + a u64 each)
_PARAMS = struct.Struct("<10I8IQ8IQ")
# struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len,
# rw_flags, user_data, buf_index, personality, splice_fd_in, addr3, pad
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
# struct io_uring_cqe: user_data, res, flags
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"io_uring: {os.strerror(e)}")
    return ret


class Uring:
    """One io_uring instance with `entries` submission slots (and twice as
    many completion slots)."""

    def __init__(self, entries: int = 64) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        self.fd = _check(_syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(entries), params))
        self._maps: list[mmap.mmap] = []
        try:
            p = _PARAMS.unpack(params.raw)
            sq_entries, cq_entries, _, _, _, features = p[:6]
            sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
            cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
            if not features & FEAT_NODROP:
                raise OSError(errno.ENOSYS, "io_uring: kernel too old (no IORING_FEAT_NODROP: before 5.5)")
            sq_size = sq_array + 4 * sq_entries
            cq_size = cqes + _CQE.size * cq_entries
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            if features & FEAT_SINGLE_MMAP:
                sq = cq = mmap.mmap(self.fd, max(sq_size, cq_size), flags, prot, offset=_OFF_SQ_RING)
                self._maps.append(sq)
            else:
                sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
                self._maps.append(sq)
                cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
                self._maps.append(cq)
            sqes = mmap.mmap(self.fd, _SQE.size * sq_entries, flags, prot, offset=_OFF_SQES)
            self._maps.append(sqes)
        except BaseException:
            self.close()
            raise
        self.entries = sq_entries
        self._sq = sq
        self._cq = cq
        self._sqes = sqes
        self._sq_head = sq_head
        self._sq_tail = sq_tail
        # (the offsets structs locate the masks; their values are in the rings)
        self._sq_mask = _U32.unpack_from(sq, sq_mask)[0]
        self._cq_head = cq_head
        self._cq_tail = cq_tail
        self._cq_mask = _U32.unpack_from(cq, cq_mask)[0]
        self._cqes = cqes
        # the index array maps slot i to SQE i, once and for all
        for i in range(sq_entries):
            _U32.pack_into(sq, sq_array + 4 * i, i)
        self.tail = _U32.unpack_from(sq, sq_tail)[0]
        #: operations submitted and not reaped yet
        self.pending = 0

    @classmethod
    def open(cls, entries: int = 64) -> Uring:
        """A ring, or OSError where this kernel or sandbox has none."""
        return cls(entries)

    def close(self) -> None:
        """Unmap and close. Operations still running are cancelled by the
        kernel, which waits for them: reap everything first."""
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still exported: left to the GC
                pass
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register_eventfd(self, efd: int) -> None:
        """Have every completion signal the eventfd `efd`."""
        arg = ctypes.c_int(efd)
        _check(_syscall(ctypes.c_long(SYS_IO_URING_REGISTER), ctypes.c_int(self.fd),
                        ctypes.c_uint(REGISTER_EVENTFD), ctypes.byref(arg), ctypes.c_uint(1)))

    def submit(self, op: int, fd: int, addr: int, length: int, offset: int, user_data: int,
               flags: int = 0, op_flags: int = 0) -> None:
        """Queue one operation and hand it to the kernel now. `addr`: the
        address of a `struct iovec[]` for READV/WRITEV (`length` entries),
        `op_flags`: the RWF_* flags (READV/WRITEV) or FSYNC_DATASYNC."""
        if self.tail - _U32.unpack_from(self._sq, self._sq_head)[0] >= self.entries:
            raise OSError(errno.EBUSY, "io_uring: submission ring full")
        t = self.tail
        _SQE.pack_into(self._sqes, _SQE.size * (t & self._sq_mask), op, flags, 0, fd, offset, addr, length,
                       op_flags, user_data, 0, 0, 0, 0, 0)
        self.tail = t = (t + 1) & 0xFFFFFFFF
        # x86 and the syscall below order the SQE stores before the kernel's read
        _U32.pack_into(self._sq, self._sq_tail, t)
        self.pending += 1
        while True:
            n = _syscall(ctypes.c_long(SYS_IO_URING_ENTER), ctypes.c_int(self.fd), ctypes.c_uint(1),
                         ctypes.c_uint(0), ctypes.c_uint(0), None, ctypes.c_size_t(0))
            if n >= 0:
                break
            e = ctypes.get_errno()
            if e not in (errno.EINTR, errno.EAGAIN):
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
            # EAGAIN: kernel short of memory for the request, try again

    def ready(self) -> bool:
        """Completions are waiting to be reaped (a read of the ring)."""
        return _U32.unpack_from(self._cq, self._cq_tail)[0] != _U32.unpack_from(self._cq, self._cq_head)[0]

    def reap(self) -> list[tuple[int, int]]:
        """(user_data, result) of every completion present; `result` is the
        byte count or -errno."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head)[0]
        tail = _U32.unpack_from(cq, self._cq_tail)[0]
        out: list[tuple[int, int]] = []
        if head == tail:
            return out
        mask = self._cq_mask
        base = self._cqes
        while head != tail:
            ud, res, _ = _CQE.unpack_from(cq, base + _CQE.size * (head & mask))
            out.append((ud, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cq, self._cq_head, head)
        self.pending -= len(out)
        return out

    def wait(self, count: int = 1) -> None:
        """Block (GIL released) until at least `count` completions are there."""
        while True:
            n = _syscall(ctypes.c_long(SYS_IO_URING_ENTER), ctypes.c_int(self.fd), ctypes.c_uint(0),
                         ctypes.c_uint(count), ctypes.c_uint(ENTER_GETEVENTS), None, ctypes.c_size_t(0))
            if n >= 0:
                return
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")


__all__ = ["FSYNC_DATASYNC", "OP_FSYNC", "OP_NOP", "OP_READV", "OP_WRITEV", "SQE_ASYNC", "Uring"]
