"""Fuzz targets: each takes the fuzzer's bytes and raises only on a real bug.

An exception other than the documented error types, a hang (the runner's
per-input timeout), a write outside guest memory (canaries), an fd leak, or
a chain completed other than exactly once is a finding.

Input formats (what `fuzz.make_corpus` writes):

ring::

    [0]    flags: bit0 packed, bit1 EVENT_IDX, bit2 INDIRECT_DESC, bit3 eager policy, bit4 pop_bulk
    [1]    ring size selector (SPLIT_SIZES / PACKED_SIZES)
    [2:4]  start index, u16 (split: last_avail = used_idx; packed: start slot/wrap)
    [4]    pop limit - 1 (then taken modulo 2 * size)
    [5:7]  image length L, u16
    [7:7+L] guest memory from gpa RING_BASE on (rings, tables, buffers)
    [...]  driver writes during the run: (offset u16 from RING_BASE, value u16), one per round

codec::

    [0]    bit0 ReplyDecoder instead of Decoder, bits 1-7 max_queues (0: None), [1] expected reply code
    then chunks: [length u8][fd count u8 (mod 11)][length bytes] ... fed in order
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from pyvirtio.driver import ring_layout
from pyvirtio.memory import CountingMemory, GuestMemory, Region
from pyvirtio.queue import QueueError, QueueState, Virtqueue
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import (
    MAX_FDS,
    MAX_MESSAGE_SIZE,
    BackendProtocolError,
    Decoder,
    FrontendProtocolError,
    ReplyDecoder,
    UnusableDecoderError,
)

MEM_SIZE = 0x10000
RING_BASE = 0x1000
MAX_IMAGE = MEM_SIZE - RING_BASE
GUARD = 256
CANARY = 0xA5
SPLIT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PACKED_SIZES = (1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 100, 256)
MAX_ROUNDS = 64


def ring_layout_for(packed: bool, size: int) -> tuple[int, int, int, int]:
    return ring_layout(packed, size, RING_BASE)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


# --- the ring walker -----------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RingCase:
    """A ring harness input decoded: the queue's configuration, and guest
    memory holding the ring image between canary guards. `r` reads the
    rest of the input (the scribbles between rounds)."""

    r: _Reader
    packed: bool
    size: int
    start: int
    limit: int
    host: bytearray
    mv: memoryview
    raw: GuestMemory
    mem: CountingMemory
    desc: int
    drv: int
    dev: int
    features: int
    policy: str
    bulk: bool
    state: QueueState | None


def decode_ring_case(data: bytes) -> RingCase:
    """The ring harness's input format (shared by `ring` and the engine
    equivalence trace)."""
    r = _Reader(data)
    flags = r.u8()
    packed = bool(flags & 1)
    sizes = PACKED_SIZES if packed else SPLIT_SIZES
    size = sizes[r.u8() % len(sizes)]
    start = r.u16()
    limit = 1 + r.u8() % (2 * size)
    image = r.take(min(r.u16(), MAX_IMAGE, r.left()))

    host = bytearray([CANARY]) * (GUARD + MEM_SIZE + GUARD)
    host[GUARD + RING_BASE:GUARD + RING_BASE + len(image)] = image
    mv = memoryview(host)[GUARD:GUARD + MEM_SIZE]
    mv[:RING_BASE] = bytes(RING_BASE)
    mv[RING_BASE + len(image):] = bytes(MEM_SIZE - RING_BASE - len(image))
    raw = GuestMemory([Region.from_buffer(mv, 0)])
    mem = CountingMemory(raw)
    desc, drv, dev, _end = ring_layout_for(packed, size)
    features = int(Feature.VERSION_1)
    if packed:
        features |= Feature.RING_PACKED
    if flags & 2:
        features |= Feature.RING_EVENT_IDX
    if flags & 4:
        features |= Feature.RING_INDIRECT_DESC
    policy = "eager" if flags & 8 else "lazy"
    bulk = bool(flags & 16) and policy == "lazy"
    if packed:
        slot, wrap = start % size, not (start // size) & 1
        state = QueueState(size, True, slot, wrap, slot, wrap) if start % (2 * size) else None
    else:
        state = QueueState(size, False, last_avail=start, used_idx=start) if start else None
    return RingCase(r, packed, size, start, limit, host, mv, raw, mem, desc, drv, dev, features, policy, bulk,
                    state)


def ring(data: bytes) -> None:
    case = decode_ring_case(data)
    r, host, raw, mem, size, limit, bulk = case.r, case.host, case.raw, case.mem, case.size, case.limit, case.bulk
    desc, drv, dev, features, policy, state = case.desc, case.drv, case.dev, case.features, case.policy, case.state
    try:
        vq = Virtqueue(mem, size, desc, drv, dev, features=features, policy=policy, state=state)  # type: ignore[arg-type]
    except QueueError:
        return
    lo = _addr(memoryview(host)[GUARD:GUARD + MEM_SIZE])
    for _ in range(MAX_ROUNDS):
        units: list[tuple[object, list]] = []
        try:
            got = vq.pop_bulk(limit) if bulk else vq.pop_batch(limit)
            if hasattr(got, "chains"):
                units = [(got, got.chains())]  # type: ignore[union-attr]
            else:
                units = [(c, [c]) for c in got]  # type: ignore[union-attr]
        except QueueError:
            pass
        assert sum(len(cs) for _, cs in units) <= limit, "more chains than the limit"
        for unit, chains in units:  # each completed once (twice would raise ValueError: a finding)
            ws = []
            for c in chains:
                for v in c.readable + c.writable:
                    a = _addr(v)
                    assert lo <= a and a + len(v) <= lo + MEM_SIZE, "a chain's view lies outside guest memory"
                assert sum(map(len, c.readable)) == c.readable_len
                assert sum(map(len, c.writable)) == c.writable_len
                ws.append(c.write(b"\xd7" * min(c.writable_len, 32)))
            if hasattr(unit, "chains"):
                vq.complete_bulk(unit, np.array(ws, np.uint32))  # type: ignore[arg-type]
            else:
                vq.complete(unit, ws[0])  # type: ignore[arg-type]
        try:
            vq.flush()
            vq.has_work()
            vq.arm()
        except QueueError:
            pass
        if r.left() >= 4:
            off, value = r.u16(), r.u16()
            gpa = RING_BASE + off % (MAX_IMAGE - 1)
            raw.write(gpa, struct.pack("<H", value))
        elif not units:
            break
    vq.flush()
    assert vq.in_flight == 0, "a chain handed out was never completed"
    assert host[:GUARD] == bytes([CANARY]) * GUARD and host[GUARD + MEM_SIZE:] == bytes([CANARY]) * GUARD


def _addr(v: memoryview) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(v))


# --- the vhost-user codec -------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def codec(data: bytes) -> None:
    r = _Reader(data)
    head = r.u8()
    expect_code = r.u8()
    reply = bool(head & 1)
    mq = head >> 1
    dec: Decoder | ReplyDecoder = ReplyDecoder() if reply else Decoder(max_queues=mq or None)
    error = BackendProtocolError if reply else FrontendProtocolError
    before = _fd_count()
    failed = False
    while r.left():
        n = r.u8()
        nfds = r.u8() % (MAX_FDS + 3)
        chunk = r.take(min(n, r.left()))
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        try:
            dec.feed(chunk, fds)
        except UnusableDecoderError:
            assert failed, "a decoder refused input before any error"
            break
        try:
            while True:
                msg = dec.next_message(expect_code or None) if reply else dec.next_message()  # type: ignore[call-arg]
                if msg is None:
                    break
                for fd in msg.fds:
                    os.fstat(fd)
                msg.close_fds()
        except error:
            failed = True
            assert dec.pending_fds == 0 and dec.pending_bytes == 0
            continue
        assert dec.pending_bytes < MAX_MESSAGE_SIZE and dec.pending_fds <= MAX_FDS
    dec.close()
    assert _fd_count() == before, "fds leaked or closed twice"


TARGETS = {"ring": ring, "codec": codec}
