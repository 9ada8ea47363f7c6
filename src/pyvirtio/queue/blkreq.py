"""virtio-blk requests, parsed and (when the host page cache holds them)
served inside the engine: the blk device's per-request loop as a batch
operation it calls once per batch.

Compiled with the engine (mypyc, see setup.py); this file is also the pure-
Python version. The device (`pyvirtio.devices.blk`) keeps the I/O pool,
writes, flushes, discards and the host-error policy; what runs here is what
every request pays:

- `parse`: the request's header, bounds and shape (virtio 1.2 5.2.6). Every
  guest value is checked as in plain Python: the header is unpacked from a
  view of the chain's own buffers, the sector range is checked against the
  capacity before any I/O, lengths come from the chain (never grown).
- `serve`: `parse` for each chain of a batch; a read the page cache holds
  all of is done right there with preadv2(RWF_NOWAIT) (it cannot block),
  its status written and its completion appended; everything else goes to
  the device's `run(chain, request)` in order.

A bad request gets a status, never an exception (see `parse`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable
from typing import Any, Final

from pyvirtio.queue.chain import Chain, IovChain
from pyvirtio.spec import (
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
)

#: the largest number of iovecs one preadv/pwritev takes (UIO_MAXIOV)
IOV_MAX: Final = 1024
#: DISCARD / WRITE_ZEROES limits advertised in the config space
MAX_DWZ_SECTORS: Final = 0x3FFFFF
MAX_DWZ_SEG: Final = 32
#: struct iovec: base, length
IOVEC: Final = struct.Struct("<QQ")
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 8)
HDR_SIZE: Final = 16  # REQ_HDR.size

#: the C library, errno kept (devices/blk.py takes its calls from here too)
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_preadv2: Any = libc.preadv2
_preadv2.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int)
_preadv2.restype = ctypes.c_ssize_t

#: `read_cached` results besides a byte count
NOT_CACHED: Final = -1
NOWAIT_UNSUPPORTED: Final = -2


class BlkRequest:
    """A parsed request waiting for (or doing) its I/O."""

    __slots__ = ("chain", "data", "iov", "kind", "nbytes", "offset", "payload", "queue", "status", "written")

    def __init__(self, kind: int, chain: Chain, status: memoryview, written: int) -> None:
        self.kind = kind
        self.chain = chain
        #: the status byte (a one-byte view of the chain's last writable buffer)
        self.status = status
        #: the used length to return
        self.written = written
        self.data: list[memoryview] = []
        self.offset = 0
        self.nbytes = 0
        self.payload = b""
        #: the queue that gets it back, when it runs in the device's pool
        self.queue: Any = None
        #: the data as a `struct iovec[]` (from an `IovChain`) instead of `data`
        self.iov: bytes | None = None


def gather(views: list[memoryview], start: int, length: int) -> bytes:
    """`length` bytes of the stream `views` from offset `start` (a copy)."""
    out = bytearray()
    for v in views:
        n = len(v)
        if start >= n:
            start -= n
            continue
        out += v[start:start + length - len(out)]
        start = 0
        if len(out) >= length:
            break
    return bytes(out)


def tail(views: list[memoryview], start: int) -> list[memoryview]:
    """The views of the stream `views` from byte `start` on (zero-copy)."""
    out: list[memoryview] = []
    for i, v in enumerate(views):
        n = len(v)
        if start >= n:
            start -= n
            continue
        out.append(v[start:] if start else v)
        out.extend(views[i + 1:])
        break
    return out


def _answer(counts: Any, status: memoryview, s: int, written: int) -> int:
    if s == S_IOERR:
        counts.ioerr += 1
    elif s == S_UNSUPP:
        counts.unsupp += 1
    status[0] = s
    return written


def parse(chain: Chain, capacity: int, read_only: bool, serial: bytes, counts: Any) -> BlkRequest | int:
    """Parse one request. Returns the used length when it is already
    answered (a bad request with its status written, GET_ID, a chain with
    no room for a status), else a `BlkRequest` to run.

    `capacity` in sectors; `serial` the GET_ID answer (at most ID_BYTES,
    NUL-padded here);
    `counts` the device's `BlkStats` (no_status, get_ids, ioerr, unsupp)."""
    if type(chain) is IovChain:
        fast = _parse_iov(chain, capacity, read_only, counts)
        if fast is not None:
            return fast
    w = chain.writable
    wlen = chain.writable_len
    if not wlen:
        counts.no_status += 1
        return 0  # no room for a status: return the chain, write nothing
    last = w[-1]
    status = last[len(last) - 1:]
    r = chain.readable
    rlen = chain.readable_len
    if rlen < HDR_SIZE:
        return _answer(counts, status, S_IOERR, wlen)
    h0 = r[0]
    typ, _, sector = REQ_HDR.unpack_from(h0 if len(h0) >= HDR_SIZE else gather(r, 0, HDR_SIZE))
    if typ == T_IN or typ == T_OUT:
        if typ == T_IN:
            data = w[:-1] if len(last) == 1 else [*w[:-1], last[:-1]]
            n = wlen - 1
        else:
            if read_only:
                return _answer(counts, status, S_IOERR, wlen)
            data = r[1:] if len(h0) == HDR_SIZE else tail(r, HDR_SIZE)
            n = rlen - HDR_SIZE
        req = _data_request(typ, chain, status, wlen, sector, n, capacity, counts)
        if not isinstance(req, int):
            req.data = data
        return req
    if typ == T_FLUSH:
        return BlkRequest(typ, chain, status, wlen)
    if typ == T_GET_ID:
        k = min(ID_BYTES, wlen - 1)
        chain.write(serial.ljust(ID_BYTES, b"\0")[:k])
        counts.get_ids += 1
        status[0] = S_OK
        return wlen
    if typ == T_DISCARD or typ == T_WRITE_ZEROES:
        if read_only:
            return _answer(counts, status, S_IOERR, wlen)
        plen = rlen - HDR_SIZE
        if not plen or plen % DWZ_SEG.size or plen // DWZ_SEG.size > MAX_DWZ_SEG:
            return _answer(counts, status, S_IOERR, wlen)  # checked before copying anything
        payload = gather(r, HDR_SIZE, plen)
        allowed = DWZ_UNMAP if typ == T_WRITE_ZEROES else 0
        for s, num, fl in DWZ_SEG.iter_unpack(payload):
            if fl & ~allowed:
                return _answer(counts, status, S_UNSUPP, wlen)
            if num > MAX_DWZ_SECTORS or s > capacity or num > capacity - s:
                return _answer(counts, status, S_IOERR, wlen)
        req = BlkRequest(typ, chain, status, wlen)
        req.payload = payload
        return req
    return _answer(counts, status, S_UNSUPP, wlen)


def _parse_iov(chain: IovChain, capacity: int, read_only: bool, counts: Any) -> BlkRequest | int | None:
    """`parse` for a chain in array form (a long indirect table, the shape
    of a large read or write): the header and status are viewed, the data
    stays a `struct iovec[]`. None: not the plain shape (header whole in the
    first segment, data, status last), let `parse` do it."""
    iov = chain.iov
    n = len(iov) >> 4
    nr = chain.nr
    if not nr or nr == n or n > IOV_MAX:
        return None
    first = IOVEC.unpack_from(iov, 0)[1]
    last_host, last_len = IOVEC.unpack_from(iov, 16 * (n - 1))
    if first < HDR_SIZE or not last_len:
        return None
    typ, _, sector = REQ_HDR.unpack_from(chain.view(0, 0, HDR_SIZE))
    wlen = chain.writable_len
    if typ == T_IN:
        data = iov[16 * nr : 16 * (n - 1)]
        if last_len > 1:  # the status shares the last buffer
            data += IOVEC.pack(last_host, last_len - 1)
        nbytes = wlen - 1
    elif typ == T_OUT and first == HDR_SIZE:
        if read_only:
            return _answer(counts, chain.view(n - 1, last_len - 1), S_IOERR, wlen)
        data = iov[16 : 16 * nr]
        nbytes = chain.readable_len - HDR_SIZE
    else:
        return None
    req = _data_request(typ, chain, chain.view(n - 1, last_len - 1), wlen, sector, nbytes, capacity, counts)
    if not isinstance(req, int):
        req.iov = data
    return req


def _data_request(typ: int, chain: Chain, status: memoryview, wlen: int, sector: int, nbytes: int, capacity: int,
                  counts: Any) -> BlkRequest | int:
    """A read or write of `nbytes` at `sector`: IOERR (answered) unless
    whole sectors inside the disk (checked without overflow: `sector` is
    the guest's u64)."""
    if nbytes % SECTOR or sector > capacity or nbytes > (capacity - sector) * SECTOR:
        return _answer(counts, status, S_IOERR, wlen)
    req = BlkRequest(typ, chain, status, wlen)
    req.offset = sector * SECTOR
    req.nbytes = nbytes
    return req


def read_cached(fd: int, req: BlkRequest) -> int:
    """The read `req` with preadv2(RWF_NOWAIT), which fails instead of
    blocking unless the host page cache holds all of it: the bytes read
    (`req.nbytes` when all of it was there), `NOT_CACHED` (not all of it,
    or more iovecs than one call takes), `NOWAIT_UNSUPPORTED` (the file
    system cannot: stop asking). Neither writes the status."""
    iov = req.iov
    try:
        if iov is not None:
            got: int = _preadv2(fd, iov, len(iov) >> 4, req.offset, RWF_NOWAIT)
            if got < 0:
                return NOWAIT_UNSUPPORTED if ctypes.get_errno() == errno.EOPNOTSUPP else NOT_CACHED
            return got
        if len(req.data) > IOV_MAX:
            return NOT_CACHED
        return os.preadv(fd, req.data, req.offset, RWF_NOWAIT)
    except OSError as e:  # EAGAIN (BlockingIOError): not all cached
        return NOWAIT_UNSUPPORTED if e.errno == errno.EOPNOTSUPP else NOT_CACHED


def serve_read(fd: int, counts: Any, req: BlkRequest) -> int:
    """The read `req` done from the page cache (`read_cached`), counted in
    `counts` and its status OK: the used length; else `NOT_CACHED` or
    `NOWAIT_UNSUPPORTED`, nothing counted, the status untouched."""
    got = read_cached(fd, req)
    if got != req.nbytes:
        return got if got < 0 else NOT_CACHED
    counts.reads += 1
    counts.bytes_read += got
    req.status[0] = S_OK
    return req.written


def serve(device: Any, counters: Any, chains: list[Chain], done: list[tuple[Chain, int]],
          run: Callable[[Chain, BlkRequest], None], cached_reads: bool) -> None:
    """A batch of chains: each parsed (`parse`, with the `device`'s
    capacity, read_only, serial and counts); with `cached_reads`, a read
    the page cache holds is done here (`read_cached` on `device.fd`), its
    status written and `(chain, used length)` appended to `done`; a
    request already answered is appended too; every other request goes to
    `run(chain, request)`, in ring order. `counters` (the queue's) gets the
    packets and the bytes of the requests parsed. `device._nowait` is
    cleared when the file system refuses RWF_NOWAIT."""
    capacity: int = device.capacity
    read_only: bool = device.read_only
    serial: bytes = device.serial
    counts = device.counts
    fd: int = device.fd
    counters.packets += len(chains)
    nbytes = 0
    for ch in chains:
        r = parse(ch, capacity, read_only, serial, counts)
        if isinstance(r, int):
            done.append((ch, r))
            continue
        nbytes += r.nbytes
        if cached_reads and r.kind == T_IN and r.nbytes:
            got = serve_read(fd, counts, r)
            if got >= 0:
                counts.inline += 1
                done.append((ch, got))
                continue
            if got == NOWAIT_UNSUPPORTED:
                device._nowait = False
                cached_reads = False
        run(ch, r)
    counters.bytes += nbytes


__all__ = [
    "IOVEC",
    "IOV_MAX",
    "MAX_DWZ_SECTORS",
    "MAX_DWZ_SEG",
    "NOT_CACHED",
    "NOWAIT_UNSUPPORTED",
    "RWF_NOWAIT",
    "BlkRequest",
    "gather",
    "libc",
    "parse",
    "read_cached",
    "serve",
    "serve_read",
    "tail",
]
