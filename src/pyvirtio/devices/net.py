"""virtio-net over vhost-user, with TAP, sink, loopback and generator ports.

Queue layout (virtio 1.2 5.1.2): receiveq i = 2i, transmitq i = 2i+1, and
with MQ the control queue after the last pair (QEMU and DPDK's virtio-user
serve the control queue themselves; another front-end may hand it to us).

Every frame on a ring carries a virtio-net header: 12 bytes whenever
VERSION_1 or MRG_RXBUF is negotiated (`num_buffers` last), else the legacy
10. Ports:

- `tap:NAME`: a Linux TAP with IFF_VNET_HDR, so the header passes through
  in both directions: tx is one `os.writev` of the chain's readable views,
  rx one `os.readv` straight into the guest's writable views (mergeable rx
  buffers gathered across chains), offloads set with TUNSETOFFLOAD from what
  the guest acked. More than one pair opens an IFF_MULTI_QUEUE TAP.
- `sink`: counts tx frames (lengths only, no copy) and drops them.
- `loopback`: each pair's tx frames come back on its rx queue.
- `gen[:SIZE]`: rx queues are filled with SIZE-byte frames as fast as the
  driver posts buffers (an rx benchmark); tx is counted and dropped.

The per-queue loops are the hot path and are written for speed: whole
batches per step, lengths summed without touching payload, no per-packet
allocation beyond the queue engine's own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import struct
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np

from pyvirtio.queue import Chain
from pyvirtio.queue.bulk import Bulk
from pyvirtio.runtime import Completion, LoopGroup, Queue, QueueCounters, QueueLoop, Service, VirtioDevice
from pyvirtio.spec import (
    _U16,
    CTRL_ANNOUNCE,
    CTRL_ERR,
    CTRL_GUEST_OFFLOADS,
    CTRL_MAC,
    CTRL_MQ,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_OK,
    CTRL_RX,
    CTRL_VLAN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    HDR_F_NEEDS_CSUM,
    LEGACY_NET_HDR_SIZE,
    NET_CONFIG,
    NET_HDR,
    NET_HDR_SIZE,
    STATUS_LINK_UP,
    Feature,
    NetFeature,
    features_str,
)

log = logging.getLogger(__name__)

_MIN = np.minimum.reduce  # ufunc methods: cheaper per batch than ndarray.min()/.max()/.sum()
_MAX = np.maximum.reduce
_SUM = np.add.reduce


#: the largest frame a guest may hand over with TSO/UFO (64 KiB + Ethernet header)
MAX_GSO_FRAME = 65536 + 14 + 4

# TAP ioctls (linux/if_tun.h)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: offloads every port handles on tx (frames go to a TAP, a counter, or back to rx)
TX_OFFLOADS = (NetFeature.CSUM | NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6 | NetFeature.HOST_ECN)
RX_OFFLOADS = (NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN)


def _checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of `data`, complemented."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# --- frame delivery into rx chains ----------------------------------------------------


def deliver(held: deque[Chain], frame: bytes | bytearray | memoryview, hdr_len: int, mergeable: bool,
            done: list[tuple[Chain, int]]) -> int:
    """Copy one frame (header included) into the chains at the front of
    `held`, appending (chain, written) to `done`. Returns the chains used
    (0: not enough buffers held; nothing was taken). With `mergeable`, a
    frame may span chains and `num_buffers` is set; otherwise one chain must
    hold it all."""
    c = held[0]
    n = len(frame)
    if n <= c.writable_len:
        if c.writable and len(c.writable[0]) >= n:
            c.writable[0][:n] = frame
        else:
            c.write(frame)
        held.popleft()
        done.append((c, n))
        return 1
    if not mergeable:
        return 0
    need = n
    k = 0
    for c in held:
        k += 1
        need -= c.writable_len
        if need <= 0:
            break
    if need > 0:
        return 0
    mv = memoryview(frame)
    pos = 0
    for i in range(k):
        c = held.popleft()
        take = min(c.writable_len, n - pos)
        c.write(mv[pos:pos + take])
        done.append((c, take))
        pos += take
    first = done[-k][0]
    first.write(_U16.pack(k), 10)
    return k


class RxSource:
    """Where a pair's received frames come from. `fd`: the loop waits for it
    to become readable when the source runs dry."""

    fd: int | None = None

    def fill(self, held: deque[Chain], done: list[tuple[Chain, int]], c: QueueCounters,
             more: Callable[[], list[Chain]], room: Callable[[], int] | None = None) -> bool:
        """Deliver frames into `held` chains (`more()` pops more buffers;
        `room()` says how many more the driver could still make available:
        the ring's size minus what is in flight); return False when the
        source had no frame ready."""
        raise NotImplementedError

    def prepare_wait(self) -> bool:
        """The loop is about to sleep on `fd`: announce it; True if a frame
        arrived meanwhile (do not sleep)."""
        return False

    def end_wait(self) -> None:
        """The loop woke up."""

    def discard(self) -> None:
        """The ring stopped and its buffers went back: forget any frame
        delivered only in part."""


# --- ports -------------------------------------------------------------------------------


class Port:
    """One kind of network behind the device (the `--backend`)."""

    name = "port"
    #: feature bits the port can offer on top of the device's base set
    offloads: int = int(TX_OFFLOADS)
    #: a pair's tx hands its frames to its own rx: both rings in one thread
    #: (`LoopGroup`), with no wake-up between them
    pair_thread = False

    def configure(self, features: int, hdr_len: int) -> None:
        """The guest acked `features`; frames carry `hdr_len`-byte headers."""
        self.features = features
        self.hdr_len = hdr_len

    def tx(self, pair: int, chains: list[Chain], c: QueueCounters) -> None:
        raise NotImplementedError

    def tx_bulk(self, pair: int, bulk: Any, c: QueueCounters) -> None:
        """`tx` for a `pyvirtio.queue.bulk.Bulk` of single-buffer frames."""
        self.tx(pair, bulk.chains(), c)

    def rx_source(self, pair: int) -> RxSource | None:
        return None

    def send_host(self, frame: bytes) -> bool:
        """Put one frame out on the network as if the guest had sent it
        (after a live migration: the RARP announcing the guest's MAC).
        False when this port has no network to send to."""
        return False

    def reset(self) -> None:
        """The front-end went away."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class SinkPort(Port):
    """Counts tx frames and drops them; never receives."""

    name = "sink"
    hdr_len = NET_HDR_SIZE

    def tx(self, pair: int, chains: list[Chain], c: QueueCounters) -> None:
        # Hot path: lengths only, the payload is never touched.
        lens = [ch.readable_len for ch in chains]
        h = self.hdr_len
        if min(lens) < h or max(lens) > h + MAX_GSO_FRAME:  # not a frame: drop, count it
            good = [n for n in lens if h <= n <= h + MAX_GSO_FRAME]
            c.dropped += len(lens) - len(good)
            lens = good
        n = len(lens)
        c.packets += n
        c.bytes += sum(lens) - h * n

    def tx_bulk(self, pair: int, bulk: Any, c: QueueCounters) -> None:
        lo, hi, total = bulk.len_summary()
        h = self.hdr_len
        n = bulk.n
        if lo < h or hi > h + MAX_GSO_FRAME:  # not frames: drop, count them
            lens = bulk.lens
            lens = lens[(lens >= h) & (lens <= h + MAX_GSO_FRAME)]
            c.dropped += n - len(lens)
            n = len(lens)
            total = int(_SUM(lens))
        c.packets += n
        c.bytes += total - h * n


class _GenSource(RxSource):
    def __init__(self, port: GenPort) -> None:
        self.port = port

    def fill(self, held: deque[Chain], done: list[tuple[Chain, int]], c: QueueCounters,
             more: Callable[[], list[Chain]], room: Callable[[], int] | None = None) -> bool:
        # Hot path: one slice assignment per frame.
        frame = self.port.frame
        n = len(frame)
        payload = n - self.port.hdr_len
        hdr_len = self.port.hdr_len
        mergeable = self.port.mergeable
        delivered = 0
        append = done.append
        while held:
            ch = held[0]
            v = ch.writable[0] if ch.writable else None
            if v is not None and len(v) >= n:
                v[:n] = frame
                held.popleft()
                append((ch, n))
            elif not deliver(held, frame, hdr_len, mergeable, done):
                if not mergeable:  # a buffer too small for the frame: return it empty
                    held.popleft()
                    append((ch, 0))
                    c.dropped += 1
                    continue
                extra = more()
                if not extra:
                    break
                held.extend(extra)
                continue
            delivered += 1
        c.packets += delivered
        c.bytes += delivered * payload
        return True


    def fill_bulk(self, bulk: Any, c: QueueCounters) -> Any:
        """Fill every buffer of a `Bulk` (the common case: small buffers
        of one descriptor each). Returns the bytes written per buffer."""
        frame = self.port.frame
        n = len(frame)
        if bulk.len_summary()[0] >= n:  # every buffer big enough (Bulk.fill refuses read-only ones)
            bulk.fill(frame)  # one batch copy in the engine
            k = bulk.n
            c.packets += k
            c.bytes += k * (n - self.port.hdr_len)
            return n
        views = bulk.views()
        written = []
        ok = bulk.lens >= n
        for v, fits in zip(views, ok.tolist()):
            if fits:
                v[:n] = frame
                written.append(n)
            else:  # too small for a frame (and not mergeable in one bulk): return it empty
                written.append(0)
                c.dropped += 1
        k = written.count(n)
        c.packets += k
        c.bytes += k * (n - self.port.hdr_len)
        return written


class GenPort(SinkPort):
    """rx: SIZE-byte frames as fast as buffers come; tx: counted and dropped."""

    name = "gen"

    def __init__(self, size: int = 64, mac: bytes = b"\x02\0\0\0\0\x01") -> None:
        if not 14 <= size <= 65535:
            raise ValueError(f"generated frame size {size} is not in 14..65535")
        self.size = size
        self.mac = mac
        self.hdr_len = NET_HDR_SIZE
        self.mergeable = False
        self._build()

    def _build(self) -> None:
        hdr = bytearray(self.hdr_len)
        if self.hdr_len == NET_HDR_SIZE:
            hdr[10:12] = _U16.pack(1)
        src = b"\x02\x00\x00\x00\x00\x02"
        eth = self.mac + src + b"\x88\xb5"  # local experimental ethertype
        body = bytes(i & 0xFF for i in range(self.size - len(eth)))
        self.frame = bytes(hdr) + eth + body

    def configure(self, features: int, hdr_len: int) -> None:
        super().configure(features, hdr_len)
        self.mergeable = bool(features & NetFeature.MRG_RXBUF)
        self._build()

    def rx_source(self, pair: int) -> RxSource | None:
        return _GenSource(self)


class _LoopQueue(RxSource):
    """Frames a pair's tx queue sent, waiting for its rx queue."""

    LIMIT = 4096
    fd: int

    def __init__(self, port: LoopbackPort) -> None:
        self.port = port
        self.frames: deque[bytes] = deque()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.waiting = False
        #: the rx ring's service while it runs (`LoopbackPort.tx_bulk` may
        #: fill its ring's buffers directly)
        self.rx: _RxService | None = None
        #: tx batches copied straight into rx buffers (no frame queued)
        self.direct = 0

    def attach(self, svc: _RxService | None) -> None:
        self.rx = svc

    def push(self, frames: list[bytes], c: QueueCounters, lead_or: int = -1) -> None:
        """Queue a tx batch for the rx queue. Frames that ask for an offload
        (header flags or gso_type set; `lead_or` 0 says none does) are made
        valid for this guest first (`LoopbackPort.fix_header`, dropped and
        counted when they cannot be), so every queued frame can be copied
        as it is."""
        if lead_or:
            fix = self.port.fix_header
            ok = []
            for f in frames:
                if f[0] | f[1]:
                    g = fix(f)
                    if g is None:
                        c.dropped += 1
                        continue
                    f = g
                ok.append(f)
            frames = ok
        room = self.LIMIT - len(self.frames)
        if room < len(frames):
            c.dropped += len(frames) - max(room, 0)
            frames = frames[: max(room, 0)]
        self.frames.extend(frames)
        if self.waiting:
            try:
                os.eventfd_write(self.fd, 1)
            except OSError:
                pass

    def fill(self, held: deque[Chain], done: list[tuple[Chain, int]], c: QueueCounters,
             more: Callable[[], list[Chain]], room: Callable[[], int] | None = None) -> bool:
        frames = self.frames
        if not frames:
            return False
        hdr_len = self.port.hdr_len
        mergeable = self.port.mergeable
        v1 = hdr_len == NET_HDR_SIZE
        append = done.append
        popframe = frames.popleft
        popchain = held.popleft
        packets = nbytes = 0
        while frames and held:
            # (push made every frame's header valid for this guest)
            frame = frames[0]
            ch = held[0]
            w = ch.writable
            n = len(frame)
            if w and len(w[0]) >= n:
                # Hot path: the frame fits the first buffer of the next
                # chain: one copy, num_buffers patched in place.
                v = w[0]
                v[:n] = frame
                if v1:
                    v[10:12] = b"\x01\x00"
                popchain()
                popframe()
                append((ch, n))
                packets += 1
                nbytes += n - hdr_len
                continue
            if hdr_len == NET_HDR_SIZE and (frame[10] != 1 or frame[11]):
                frame = frames[0] = frame[:10] + b"\x01\x00" + frame[12:]
            if not deliver(held, frame, hdr_len, mergeable, done):
                if not mergeable and held[0].writable_len < len(frame):
                    frames.popleft()  # cannot ever fit one buffer: drop it, keep the buffer
                    c.dropped += 1
                    continue
                got = more()
                if not got:
                    break
                held.extend(got)
                continue
            frames.popleft()
            packets += 1
            nbytes += len(frame) - hdr_len
        c.packets += packets
        c.bytes += nbytes
        return True

    def pending(self) -> int:
        """Frames waiting: the rx service takes no more buffers than this
        at once, so that a `Bulk` is filled whole."""
        return len(self.frames)

    def fill_bulk(self, bulk: Bulk, c: QueueCounters) -> Any:
        """One frame into each buffer of `bulk`, in one engine call (the
        forwarding hot path). Returns the bytes written (an int when every
        frame has the same length), or None, having taken nothing, unless
        the first `bulk.n` frames each fit their buffer: the caller then
        takes the buffers one by one (`fill`)."""
        frames = self.frames
        n = bulk.n
        if len(frames) < n:
            return None
        batch = list(islice(frames, n))
        h = self.port.hdr_len
        # the frames carry the sender's header: num_buffers becomes 1 here (v1 header)
        got = bulk.scatter(batch, 10, b"\x01\x00") if h == NET_HDR_SIZE else bulk.scatter(batch)
        if got is None:
            return None
        if n == len(frames):
            frames.clear()  # the usual case: the service took as many buffers as frames were queued
        else:
            for _ in range(n):
                frames.popleft()
        shortest, longest, total = got
        c.packets += n
        c.bytes += total - h * n
        return shortest if shortest == longest else np.array([len(f) for f in batch], np.uint32)

    def prepare_wait(self) -> bool:
        self.waiting = True
        return bool(self.frames)  # a push between the empty fill and this flag: do not sleep

    def end_wait(self) -> None:
        self.waiting = False
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class LoopbackPort(Port):
    """Each pair's tx frames come back on its rx queue (header included)."""

    name = "loopback"
    offloads = int(TX_OFFLOADS | RX_OFFLOADS)
    pair_thread = True

    def __init__(self, pairs: int) -> None:
        self.queues = [_LoopQueue(self) for _ in range(pairs)]
        self.hdr_len = NET_HDR_SIZE
        self.features = 0
        self.mergeable = False

    def configure(self, features: int, hdr_len: int) -> None:
        super().configure(features, hdr_len)
        self.mergeable = bool(features & NetFeature.MRG_RXBUF)

    def tx(self, pair: int, chains: list[Chain], c: QueueCounters) -> None:
        h = self.hdr_len
        ok = [ch for ch in chains if h <= ch.readable_len <= h + MAX_GSO_FRAME]
        if len(ok) != len(chains):  # shorter than the header or beyond any frame: drop, count
            c.dropped += len(chains) - len(ok)
        frames = [ch.readable[0].tobytes() if len(ch.readable) == 1 else b"".join(ch.readable)
                  for ch in ok]
        c.packets += len(frames)
        c.bytes += sum(map(len, frames)) - self.hdr_len * len(frames)
        self.queues[pair].push(frames, c)

    def tx_bulk(self, pair: int, bulk: Any, c: QueueCounters) -> None:
        # Hot path. Straight into the rx ring's buffers when it has one
        # for every frame and nothing is queued before them (below);
        # else the frames are copied out of the region in one engine call
        # (a device-writable buffer on tx carries no frame: left out, like
        # one shorter than the header or beyond any frame) and queued.
        h = self.hdr_len
        lq = self.queues[pair]
        rx = lq.rx
        if rx is not None and not lq.frames and not rx.held and rx._active():
            # Straight into the rx ring's next buffers, one engine call, no
            # frame object (the tx and rx loops share a thread, so the rx
            # ring may be served from here: `Queue.take_bulk`). When it
            # cannot be done whole nothing is queued here: the frames are
            # queued below, and rx buffers taken meanwhile go to the rx
            # service, which fills them from the queue as usual.
            # the frames carry the sender's header: num_buffers becomes 1 here (v1 header)
            moved = (rx.queue.receive_bulk(bulk, rx.held, h, h + MAX_GSO_FRAME, 10, b"\x01\x00")
                     if h == NET_HDR_SIZE else rx.queue.receive_bulk(bulk, rx.held, h, h + MAX_GSO_FRAME))
            if moved >= 0:
                c.packets += bulk.n
                c.bytes += moved
                lq.direct += 1
                return
            # fewer buffers than frames, or a frame the queue must look at:
            # buffers taken meanwhile are in rx.held, filled the usual way
        frames, lead_or = bulk.frames(h, h + MAX_GSO_FRAME)
        k = len(frames)
        if k != bulk.n:
            c.dropped += bulk.n - k
        c.packets += k
        c.bytes += sum(map(len, frames)) - h * k
        self.queues[pair].push(frames, c, lead_or)

    def rx_source(self, pair: int) -> RxSource | None:
        return self.queues[pair]

    def fix_header(self, frame: bytes) -> bytes | None:
        """A tx header made valid for rx: checksum in software if the guest
        cannot take NEEDS_CSUM; None (drop) for GSO it did not ack."""
        h = self.hdr_len
        if len(frame) < h:
            return None  # not a frame (tx drops these; kept safe for direct callers)
        flags, gso, _hl, _gs, start, off = struct.unpack_from("<BBHHHH", frame)
        f = self.features
        gso_ok = {GSO_NONE: True, GSO_TCPV4: f & NetFeature.GUEST_TSO4, GSO_TCPV6: f & NetFeature.GUEST_TSO6,
                  GSO_UDP: f & NetFeature.GUEST_UFO}.get(gso & ~GSO_ECN, False)
        if not gso_ok or (gso & GSO_ECN and not f & NetFeature.GUEST_ECN):
            return None
        out = bytearray(frame)
        if flags & HDR_F_NEEDS_CSUM and not f & NetFeature.GUEST_CSUM:
            if gso != GSO_NONE:
                return None
            data = out[h:]
            if start + off + 2 > len(data):
                return None
            csum = _checksum(data[start:])
            out[h + start + off:h + start + off + 2] = struct.pack("!H", csum)
            out[0] = flags & ~HDR_F_NEEDS_CSUM
        if h == NET_HDR_SIZE:
            out[10:12] = _U16.pack(1)
        return bytes(out)

    def reset(self) -> None:
        for q in self.queues:
            q.frames.clear()

    def stats(self) -> dict[str, Any]:
        return {"queued": [len(q.frames) for q in self.queues], "direct": [q.direct for q in self.queues]}

    def close(self) -> None:
        for q in self.queues:
            q.close()


class _TapSource(RxSource):
    """A TAP queue's frames into the guest's rx buffers, never cut short.

    A TAP read cannot tell the next frame's length, and a frame longer than
    the buffers given to `readv` would be truncated silently. So every read
    gets a scratch buffer after the guest's, and a frame that reaches it did
    not fit. With plain buffers it is dropped (counted; the buffer takes the
    next frame). With mergeable buffers the ones at hand keep its start and
    the rest waits for the driver's next buffers (the loop arms for them),
    as QEMU's virtio-net waits for room; only when the whole ring is in
    flight and still too small is the frame dropped."""

    fd: int

    def __init__(self, port: TapPort, fd: int) -> None:
        self.port = port
        self.fd = fd
        self._scratch = memoryview(bytearray(MAX_GSO_FRAME + NET_HDR_SIZE))
        self._rest: bytes | None = None  # the part of a frame that did not fit the buffers that hold its start
        self._filled = 0                 # how many held buffers those are

    def fill(self, held: deque[Chain], done: list[tuple[Chain, int]], c: QueueCounters,
             more: Callable[[], list[Chain]], room: Callable[[], int] | None = None) -> bool:
        port = self.port
        fd = self.fd
        hdr_len = port.hdr_len
        mergeable = port.mergeable
        want = port.rx_capacity
        scratch = self._scratch
        got_any = False
        for _ in range(64):  # bounded work per call
            if self._rest is not None:
                if not self._finish(held, done, c, more, room):
                    return True  # waiting for buffers: nothing moved, the loop arms for them
                got_any = True
                continue
            if not held:
                extra = more()
                if not extra:
                    break
                held.extend(extra)
            if mergeable:
                # Gather buffers until a maximal frame fits, then one readv.
                cap = 0
                k = 0
                for ch in held:
                    cap += ch.writable_len
                    k += 1
                    if cap >= want:
                        break
                while cap < want:
                    extra = more()
                    if not extra:
                        break
                    held.extend(extra)
                    for ch in extra:
                        cap += ch.writable_len
                        k += 1
                        if cap >= want:
                            break
                views: list[memoryview] = []
                for i in range(k):
                    views.extend(held[i].writable)
            else:
                k = 1
                views = held[0].writable
                cap = held[0].writable_len
            try:
                n = os.readv(fd, [*views, scratch])
            except BlockingIOError:
                # The TAP is empty: wait on it. (Not "starved" for buffers,
                # even if every frame read so far was dropped.)
                return False
            except OSError as e:
                log.warning("tap %s: read failed: %s", port.ifname, e)
                return got_any
            got_any = True
            if n < hdr_len:
                c.dropped += 1
                continue
            if n > cap:  # longer than the buffers it was read into
                if mergeable:
                    self._rest = bytes(scratch[:n - cap])
                    self._filled = k
                else:
                    c.dropped += 1
                continue
            if mergeable:
                _complete_merged(held, done, n)
            else:
                ch = held.popleft()
                done.append((ch, n))
                if hdr_len == NET_HDR_SIZE:
                    ch.write(b"\x01\x00", 10)
            c.packets += 1
            c.bytes += n - hdr_len
        return True

    def _finish(self, held: deque[Chain], done: list[tuple[Chain, int]], c: QueueCounters,
                more: Callable[[], list[Chain]], room: Callable[[], int] | None) -> bool:
        """Complete the frame whose start fills the first `_filled` held
        buffers: False while the driver has yet to give the buffers for its
        rest; True once it is delivered, or dropped because the ring, all in
        flight, cannot hold it (its buffers then take the next frames)."""
        rest = self._rest
        assert rest is not None
        k = self._filled
        need = len(rest)
        cap = sum(held[i].writable_len for i in range(k, len(held)))
        while cap < need:
            extra = more()
            if not extra:
                break
            held.extend(extra)
            cap += sum(ch.writable_len for ch in extra)
        if cap < need:
            if room is not None and room() > 0:
                return False
            self._rest = None
            c.dropped += 1
            return True
        self._rest = None
        n = need
        for i in range(k):
            n += held[i].writable_len
        i = k
        off = 0
        while off < need:  # the rest goes on where the read left off
            off += held[i].write(rest[off:])
            i += 1
        _complete_merged(held, done, n)
        c.packets += 1
        c.bytes += n - self.port.hdr_len
        return True

    def discard(self) -> None:
        self._rest = None


def _complete_merged(held: deque[Chain], done: list[tuple[Chain, int]], n: int) -> None:
    """A frame of `n` bytes laid out over the first held buffers, in order:
    they complete, and the first one's header says how many they are."""
    left = n
    used = 0
    while left > 0:
        ch = held.popleft()
        take = min(left, ch.writable_len)
        done.append((ch, take))
        left -= take
        used += 1
    done[-used][0].write(_U16.pack(used), 10)


class TapPort(Port):
    """A Linux TAP interface with the virtio-net header passed through."""

    name = "tap"

    def __init__(self, ifname: str, pairs: int = 1) -> None:
        if not ifname or len(ifname.encode()) > 15:
            raise ValueError(f"TAP name {ifname!r} must be 1..15 bytes")
        self.ifname = ifname
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
        self.fds: list[int] = []
        try:
            for _ in range(pairs):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                self.fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HDR_SIZE))
                os.set_blocking(fd, False)
        except OSError:
            self.close()
            raise
        self.hdr_len = NET_HDR_SIZE
        self.mergeable = False
        self.rx_capacity = 1514 + NET_HDR_SIZE
        # What the TAP will accept as offloads decides what we offer.
        offloads = int(TX_OFFLOADS | RX_OFFLOADS)
        try:
            fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        except OSError:
            offloads = int(NetFeature.CSUM | NetFeature.GUEST_CSUM)
        try:
            fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_UFO)
            offloads |= NetFeature.HOST_UFO | NetFeature.GUEST_UFO
        except OSError:
            pass
        fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, 0)
        self.offloads = offloads
        log.info("tap %s: %d queue(s), offloads %s", ifname, pairs, features_str(offloads, NetFeature))

    def configure(self, features: int, hdr_len: int) -> None:
        super().configure(features, hdr_len)
        self.mergeable = bool(features & NetFeature.MRG_RXBUF)
        off = 0
        if features & NetFeature.GUEST_CSUM:
            off |= TUN_F_CSUM
            if features & NetFeature.GUEST_TSO4:
                off |= TUN_F_TSO4
            if features & NetFeature.GUEST_TSO6:
                off |= TUN_F_TSO6
            if features & NetFeature.GUEST_ECN and off & (TUN_F_TSO4 | TUN_F_TSO6):
                off |= TUN_F_TSO_ECN
            if features & NetFeature.GUEST_UFO:
                off |= TUN_F_UFO
        gso = off & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
        self.rx_capacity = (MAX_GSO_FRAME if gso else 1514 + 4) + hdr_len
        for fd in self.fds:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", hdr_len))
            fcntl.ioctl(fd, TUNSETOFFLOAD, off)
        log.info("tap %s: header %d bytes, offloads to guest %#x", self.ifname, hdr_len, off)

    def tx(self, pair: int, chains: list[Chain], c: QueueCounters) -> None:
        fd = self.fds[pair]
        writev = os.writev
        hdr = self.hdr_len
        sent = nbytes = 0
        for ch in chains:
            try:
                writev(fd, ch.readable)
            except BlockingIOError:
                c.dropped += 1
                continue
            except OSError as e:  # e.g. EINVAL for a header the kernel refuses
                log.debug("tap %s: write failed: %s", self.ifname, e)
                c.dropped += 1
                continue
            sent += 1
            nbytes += ch.readable_len - hdr
        c.packets += sent
        c.bytes += nbytes

    def rx_source(self, pair: int) -> RxSource | None:
        return _TapSource(self, self.fds[pair])

    def send_host(self, frame: bytes) -> bool:
        hdr = getattr(self, "hdr_len", NET_HDR_SIZE)  # a zero virtio-net header: no offload asked
        try:
            os.write(self.fds[0], bytes(hdr) + frame)
        except OSError as e:
            log.warning("tap %s: could not send the announcement: %s", self.ifname, e)
            return False
        return True

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def make_port(spec: str, pairs: int, mac: bytes) -> Port:
    """`tap:NAME`, `sink`, `loopback`, `gen` or `gen:SIZE`."""
    kind, _, arg = spec.partition(":")
    if kind == "sink" and not arg:
        return SinkPort()
    if kind == "loopback" and not arg:
        return LoopbackPort(pairs)
    if kind == "gen":
        return GenPort(int(arg) if arg else 64, mac)
    if kind == "tap" and arg:
        return TapPort(arg, pairs)
    raise ValueError(f"unknown net backend {spec!r} (tap:NAME, sink, loopback, gen[:SIZE])")


# --- queue services (the runtime's loop runs them) ------------------------------------------


class _TxService(Service):
    """Frames out: one pop, one port call, one publication per batch. A run
    of single-descriptor chains comes as one `Bulk` (arrays, no object per
    packet). A started but disabled ring is consumed and dropped (vhost-user 2.4)."""

    bulk = True
    eager_each = True  # the eager baseline publishes every tx completion

    def __init__(self, queue: Queue, port: Port, pair: int, batch: int) -> None:
        super().__init__(queue)
        self.port = port
        self.pair = pair
        self.batch = batch

    def take(self) -> int:
        return self.batch

    def handle(self, got: Any, done: list[Completion]) -> None:
        # Hot path.
        q = self.queue
        c = q.counters
        if type(got) is Bulk:
            if q.enabled:
                self.port.tx_bulk(self.pair, got, c)
            else:
                c.dropped += got.n
            done.append((got, 0))
            return
        if q.enabled:
            self.port.tx(self.pair, got, c)
        else:
            c.dropped += len(got)
        done.extend([(ch, 0) for ch in got])


class _RxService(Service):
    """Frames in: the service holds the guest's rx buffers and fills them
    from its source. It takes buffers when it holds none (or a frame needs
    more than it holds: the loop then arms and sleeps for the guest's next
    buffers), and sleeps on the source's fd when the source runs dry."""

    def __init__(self, queue: Queue, device: NetDevice, source: RxSource | None, pair: int,
                 batch: int) -> None:
        super().__init__(queue)
        self.device = device
        self.source = source
        self.pair = pair
        self.batch = batch
        self.held: deque[Chain] = deque()
        self.starved = False   # the next frame needs more buffers than held
        self.dry = False       # the source had no frame
        # A source that can fill a whole `Bulk` at once: it never runs dry
        # (gen), or it says how many frames it holds (`pending`: loopback)
        # and the service takes no more buffers than that.
        self.fill_bulk = getattr(source, "fill_bulk", None)
        self.bulk = self.fill_bulk is not None
        self.pending: Callable[[], int] | None = getattr(source, "pending", None)
        self.more = queue.take_more
        attach = getattr(source, "attach", None)
        if attach is not None:
            attach(self)

    def _active(self) -> bool:
        return (self.source is not None and self.queue.enabled
                and self.pair < self.device.active_pairs)

    def take(self) -> int:
        if not self._active():
            return 0
        if self.held:
            return self.batch if self.starved else 0
        if self.pending is not None:
            return min(self.batch, self.pending())
        return self.batch

    def handle(self, got: Any, done: list[Completion]) -> None:
        if type(got) is Bulk:
            assert self.fill_bulk is not None
            written = None if self.held else self.fill_bulk(got, self.queue.counters)
            if written is not None:
                done.append((got, written))
                return
            got = self.queue.vq.unbulk(got)  # not all at once: one by one below
        self.held.extend(got)
        self._fill(done)

    def progress(self, done: list[Completion]) -> bool:
        if not self.held or self.starved or not self._active():
            return False
        return self._fill(done)

    def _fill(self, done: list[Completion]) -> bool:
        k = len(done)
        assert self.source is not None
        ready = self.source.fill(self.held, done, self.queue.counters,
                                 lambda: self.more(self.batch), self._room)
        moved = len(done) > k
        self.dry = not ready
        self.starved = ready and bool(self.held) and not moved
        return moved

    def _room(self) -> int:
        """Descriptors the driver could still make available: the ring's size
        less those in flight, counted from above (a direct chain uses one per
        buffer, an indirect one fewer), so a wait for buffers always ends."""
        vq = self.queue.vq
        used = vq.in_flight
        for item in vq.inflight:
            if isinstance(item, Chain):
                used += max(item.slots, len(item.readable) + len(item.writable)) - 1
        return vq.size - used

    def _waits_on_source(self) -> bool:
        if self.held:
            return not self.starved and self._active()
        # a source that says what it holds (loopback) is waited on while empty, holding no buffers
        return self.pending is not None and not self.pending() and self._active()

    def wake_fds(self) -> list[int]:
        src = self.source
        if src is not None and src.fd is not None and self._waits_on_source():
            return [src.fd]
        return []

    def before_sleep(self) -> bool:
        src = self.source
        if src is not None and self._waits_on_source():
            return src.prepare_wait()
        return False

    def after_sleep(self) -> None:
        if self.source is not None:
            self.source.end_wait()

    def stopped(self) -> None:
        # Chains still held were never written: handed back, so the ring's
        # next index to process is exact and they are taken again on restart.
        held = list(self.held)
        self.held.clear()
        if self.source is not None:
            self.source.discard()
            if getattr(self.source, "rx", None) is self:
                self.source.attach(None)  # type: ignore[attr-defined]
        self.queue.give_back(held)


class _CtrlService(Service):
    batch = 16
    eager_each = True

    def __init__(self, queue: Queue, device: NetDevice) -> None:
        super().__init__(queue)
        self.device = device

    def take(self) -> int:
        return self.batch

    def handle(self, chains: list[Chain], done: list[Completion]) -> None:
        for ch in chains:
            data = ch.read(65536)  # no control command is near this long
            ack = self.device.control(data) if len(data) >= 2 else CTRL_ERR
            done.append((ch, ch.write(bytes([ack])) if ch.writable_len else 0))
        self.queue.counters.packets += len(chains)


# --- the device -----------------------------------------------------------------------


class NetDevice(VirtioDevice):
    """virtio-net with one `Port` behind it and `queue_pairs` queue pairs."""

    name = "net"

    def __init__(self, backend: str = "sink", *, queue_pairs: int = 1, mtu: int = 1500,
                 mac: bytes | None = None, queue_size_max: int = 1024, batch: int = 256,
                 port: Port | None = None) -> None:
        if not 1 <= queue_pairs <= 127:
            raise ValueError(f"queue pairs {queue_pairs} is not in 1..127")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is not in 68..65535")
        self.mac = mac if mac is not None else bytes([0x02] + [random.randrange(256) for _ in range(5)])
        if len(self.mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.backend_spec = backend
        self.port = port if port is not None else make_port(backend, queue_pairs, self.mac)
        self.pairs = queue_pairs
        self.active_pairs = queue_pairs
        self.mtu = mtu
        self.batch = batch
        self.queue_size_max = queue_size_max
        self.num_queues = 2 * queue_pairs + (1 if queue_pairs > 1 else 0)
        self.queue_num = queue_pairs
        feats = (Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_PACKED | Feature.RING_INDIRECT_DESC
                 | Feature.ANY_LAYOUT | NetFeature.MRG_RXBUF | NetFeature.MTU | NetFeature.MAC
                 | NetFeature.STATUS)
        feats |= self.port.offloads
        if queue_pairs > 1:
            feats |= NetFeature.MQ | NetFeature.CTRL_VQ
        self.features = int(feats)
        self.multiqueue = True
        self.mtu_control = True
        self.announces = True
        self.negotiated = 0
        self.hdr_len = NET_HDR_SIZE
        self.loops: dict[int, QueueLoop] = {}
        self._pair_groups: dict[int, LoopGroup] = {}
        self.status = 0

    # -- VirtioDevice ---------------------------------------------------------------

    def queue_role(self, index: int) -> str:
        if index == 2 * self.pairs:
            return "ctrl"
        return f"{'tx' if index & 1 else 'rx'}{index // 2}"

    def config(self) -> bytes:
        return NET_CONFIG.pack(self.mac, STATUS_LINK_UP, self.pairs, self.mtu)

    def set_features(self, features: int) -> None:
        self.negotiated = features
        self.hdr_len = NET_HDR_SIZE if features & (Feature.VERSION_1 | NetFeature.MRG_RXBUF) else LEGACY_NET_HDR_SIZE
        self.port.configure(features, self.hdr_len)
        log.info("net: features %s, header %d bytes", features_str(features, NetFeature), self.hdr_len)

    def set_mtu(self, mtu: int) -> bool:
        if not 68 <= mtu <= 65535:
            return False
        self.mtu = mtu
        return True

    def set_status(self, status: int) -> None:
        self.status = status

    def announce(self, mac: bytes) -> bool:
        """After a live migration: a RARP request from `mac` to the
        broadcast address goes out through the port, so that switches and
        bridges learn the guest's new place (what QEMU does for its own
        network back-ends)."""
        return self.port.send_host(rarp_frame(mac))

    def queue_group(self, index: int) -> LoopGroup | None:
        if not self.port.pair_thread or index >= 2 * self.pairs:
            return None
        pair = index // 2
        g = self._pair_groups.get(pair)
        if g is None:
            g = self._pair_groups[pair] = LoopGroup(f"net.pair{pair}")
        return g

    def service(self, queue: Queue) -> Service:
        i = queue.index
        if i == 2 * self.pairs:
            return _CtrlService(queue, self)
        if i & 1:
            return _TxService(queue, self.port, i // 2, self.batch)
        return _RxService(queue, self, self.port.rx_source(i // 2), i // 2, self.batch)

    def reset(self) -> None:
        self.stop_queues()
        self.active_pairs = self.pairs
        self.port.reset()
        self.status = 0

    def close(self) -> None:
        self.reset()
        for g in self._pair_groups.values():
            g.close()
        self.port.close()

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend_spec, "queue_pairs": self.pairs, "active_pairs": self.active_pairs,
                "mtu": self.mtu, "mac": self.mac.hex(":"), "header": self.hdr_len,
                "negotiated": features_str(self.negotiated, NetFeature), **self.port.stats()}

    # -- control queue ------------------------------------------------------------

    def control(self, data: bytes) -> int:
        """One control command (class, command, data); returns the ack byte."""
        cls, cmd = data[0], data[1]
        body = data[2:]
        if cls == CTRL_MQ and cmd == CTRL_MQ_VQ_PAIRS_SET:
            if len(body) < 2:
                return CTRL_ERR
            pairs = _U16.unpack_from(body)[0]
            if not 1 <= pairs <= self.pairs:
                log.warning("net: guest asked for %d queue pairs of %d", pairs, self.pairs)
                return CTRL_ERR
            self.active_pairs = pairs
            self.wake_all()
            log.info("net: %d queue pair(s) active", pairs)
            return CTRL_OK
        if cls == CTRL_GUEST_OFFLOADS:
            return CTRL_OK if len(body) >= 8 else CTRL_ERR
        if cls in (CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE):
            return CTRL_OK  # no filtering: every frame is delivered
        return CTRL_ERR


def rarp_frame(mac: bytes) -> bytes:
    """A RARP "request reverse" from `mac`, broadcast, padded to 60 bytes."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + struct.pack("!H", 0x8035) + body).ljust(60, b"\0")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)


__all__ = [
    "NET_HDR",
    "NET_HDR_SIZE",
    "GenPort",
    "LoopbackPort",
    "NetDevice",
    "NetFeature",
    "Port",
    "SinkPort",
    "TapPort",
    "deliver",
    "make_port",
    "parse_mac",
    "rarp_frame",
]
