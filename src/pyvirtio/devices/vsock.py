"""virtio-vsock (virtio 1.2 5.10): stream sockets between a guest and host programs.

Queues: rx (0, device to driver), tx (1, driver to device), event (2). Every
packet on rx and tx starts with a 44-byte `virtio_vsock_hdr` (`VSOCK_HDR`).
Only stream sockets are served (no SEQPACKET).

Host side, the hybrid convention of Firecracker and vhost-device-vsock:

- a guest connecting to the host (CID 2) port N reaches the Unix socket
  `<uds_path>_N` (connection refused there: the guest gets RST);
- a host program connecting to `<uds_path>` and writing `CONNECT N\\n`
  reaches the guest's listener on port N; once the guest accepts, the
  program reads `OK <port>\\n` (the host port the guest sees as its peer)
  and the bytes flow. A guest that refuses closes the Unix socket.

Flow control is the spec's credit scheme. Each side advertises `buf_alloc`
(its receive buffer) and `fwd_cnt` (bytes it consumed) in every packet; a
sender never has more than `buf_alloc - (sent - fwd_cnt)` bytes in flight.
Guest to host: bytes the host socket does not take at once wait in a
per-connection buffer that the guest's credit bounds by `buf_alloc`, and
`fwd_cnt` advances as the host socket takes them (a CREDIT_UPDATE goes out
when the guest's view of our free space falls below half). Host to guest:
a host socket is read only while the guest has credit for it, straight
into the guest's rx buffer, a chain per connection in turn, so a slow
guest reader leaves the bytes in the host socket (its sender blocks) and
never stalls another connection.

Shutdown: the guest's SHUTDOWN SEND half-closes the host socket once its
bytes are written; SHUTDOWN RCV stops reading it; both (a guest close())
are answered, after the last bytes are written, with RST and the host
socket is closed. End of file from the host socket is the host's
half-close: SHUTDOWN SEND to the guest. An error on the host socket, a
guest RST, or a packet that breaks the protocol ends the connection (RST
both ways where the other side still knows it).

Threads: the rx and tx loops share the connection table under one lock;
all socket I/O is non-blocking. Work for the other loop (a RESPONSE, a
CREDIT_UPDATE, an RST owed to the guest) wakes it.

The event queue's buffers are held; `transport_reset()` drops every
connection and tells the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
QEMU's vhost-user-vsock keeps the event queue to itself (it sends the event
after a migration), so with QEMU only rx and tx reach this device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from pyvirtio.queue import Chain
from pyvirtio.runtime import Completion, Queue, Service, VirtioDevice
from pyvirtio.spec import (
    VSOCK_CID_HOST,
    VSOCK_CONFIG,
    VSOCK_EVENT,
    VSOCK_EVENT_ID,
    VSOCK_EVENT_TRANSPORT_RESET,
    VSOCK_HDR,
    VSOCK_HDR_SIZE,
    VSOCK_RX,
    VSOCK_TX,
    Feature,
    VsockFeature,
    VsockOp,
    VsockShutdown,
    VsockType,
    features_str,
)

log = logging.getLogger(__name__)

KiB = 1 << 10
#: what we advertise as our receive buffer per connection (guest to host bytes in flight)
DEFAULT_BUF_ALLOC = 256 * KiB
#: connections at once (guest- and host-initiated, and host sockets still sending CONNECT)
DEFAULT_MAX_CONNECTIONS = 1024
#: the longest payload we put in one rx packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PAYLOAD = 64 * KiB
#: RSTs for unknown connections waiting for rx buffers; more are dropped
MAX_PENDING_RST = 1024
#: the longest `CONNECT <port>` line
CONNECT_LINE_MAX = 32
#: rx chains one progress pass fills before the loop publishes them
FILL_PER_PASS = 64
#: seconds a host program gets to send its CONNECT line, and then the guest to answer, before it is closed
CONNECT_TIMEOUT = 10.0
#: first host port given to host-initiated connections (as Firecracker: high, clear of well-known ports)
HOST_PORT_BASE = 1 << 30

_ALL_SHUT = int(VsockShutdown.RCV | VsockShutdown.SEND)
# control packets a connection may owe the guest, in the order they go out
_OWED_ORDER = (VsockOp.REQUEST, VsockOp.RESPONSE, VsockOp.CREDIT_UPDATE, VsockOp.CREDIT_REQUEST,
               VsockOp.SHUTDOWN)


@dataclass(slots=True)
class VsockCounters:
    """What the device did since it started (all connections)."""

    guest_connects: int = 0     # REQUESTs from the guest that reached a host socket
    guest_refused: int = 0      # REQUESTs answered with RST (no such host socket, too many connections)
    host_connects: int = 0      # CONNECT lines that reached a guest listener
    host_refused: int = 0       # CONNECT lines the guest refused, or bad lines
    resets_to_guest: int = 0    # RST packets sent
    resets_from_guest: int = 0  # RST packets received
    rst_dropped: int = 0        # RSTs for unknown connections not sent (no rx buffers, queue full)
    bytes_to_host: int = 0      # payload written to host sockets
    bytes_to_guest: int = 0     # payload put in rx buffers
    credit_updates: int = 0     # CREDIT_UPDATE packets sent
    credit_requests: int = 0    # CREDIT_REQUEST packets sent
    bad_packets: int = 0        # tx packets ignored (wrong CID, short, bad length, unknown op)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Conn:
    """One stream connection: a host socket and the guest's end (host_port, guest_port)."""

    __slots__ = ("closed", "credit_asked", "deadline", "fd", "fwd_cnt", "fwd_sent", "guest_port", "guest_shut", "host_eof",
                 "host_port", "host_wr_shut", "out", "out_bytes", "owed", "peer_buf_alloc", "peer_fwd_cnt",
                 "preamble", "queued", "rx_cnt", "shut_owed", "sock", "state", "tx_cnt")

    CONNECTING = "connecting"  # host-initiated: REQUEST owed or sent, no RESPONSE yet
    CONNECTED = "connected"

    def __init__(self, sock: socket.socket, host_port: int, guest_port: int, state: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.host_port = host_port
        self.guest_port = guest_port
        self.state = state
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0          # payload bytes sent to the guest
        self.rx_cnt = 0          # payload bytes received from the guest
        self.fwd_cnt = 0         # of those, bytes the host socket took
        self.fwd_sent = 0        # the fwd_cnt the guest last heard from us
        self.out: deque[memoryview] = deque()  # guest bytes (and our OK line) waiting for the host socket
        self.out_bytes = 0
        self.preamble = 0        # leading bytes of `out` that are ours, not the guest's
        self.guest_shut = 0      # SHUTDOWN flags the guest sent
        self.host_eof = False    # the host socket's read side ended
        self.host_wr_shut = False
        self.owed: set[VsockOp] = set()  # control packets owed to the guest
        self.shut_owed = 0
        self.queued = False      # in the device's `ready` queue
        self.credit_asked = False
        self.closed = False
        self.deadline = 0.0      # CONNECTING: when to give up on the guest's answer

    def peer_credit(self) -> int:
        """Bytes the guest can take now."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


def _views(views: Sequence[memoryview], skip: int, length: int) -> list[memoryview]:
    """The bytes [skip, skip + length) of a chain's buffers, as views."""
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        if take <= 0:
            break
        out.append(v[skip:skip + take])
        length -= take
        skip = 0
    return out


class VsockDevice(VirtioDevice):
    """virtio-vsock for the guest `guest_cid`, with host programs on Unix
    sockets: `uds_path` (host-initiated, `CONNECT N`) and `uds_path_N`
    (guest-initiated to host port N). `buf_alloc`: receive buffer advertised
    per connection (bounds the bytes the device holds for one slow host
    reader); `max_connections`: connections at once; `connect_timeout`:
    seconds a host program's CONNECT waits for the guest to answer."""

    name = "vsock"
    num_queues = 3
    queue_num = 3
    config_space = True
    features = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC | Feature.RING_PACKED)

    def __init__(self, guest_cid: int, uds_path: str, *, buf_alloc: int = DEFAULT_BUF_ALLOC,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, connect_timeout: float = CONNECT_TIMEOUT,
                 batch: int = 64) -> None:
        if not 3 <= guest_cid <= 0xFFFFFFFE:
            raise ValueError(f"guest CID {guest_cid} is not in 3..{0xFFFFFFFE}")
        if not 4 * KiB <= buf_alloc <= 1 << 30:
            raise ValueError(f"buf_alloc {buf_alloc} is not in 4 KiB..1 GiB")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.batch = batch
        self.loops = {}
        self.lock = threading.RLock()
        self.conns: dict[tuple[int, int], _Conn] = {}   # (host port, guest port) -> connection
        # host sockets yet to send their CONNECT line: fd -> (socket, the line so far, deadline)
        self.pending: dict[int, tuple[socket.socket, bytearray, float]] = {}
        self.ready: deque[_Conn] = deque()   # connections owing the guest control packets
        self.rsts: deque[tuple[int, int, int]] = deque()  # (from CID, host port, guest port): RSTs, unknown connections
        self.events: deque[int] = deque()    # event ids for the event queue
        self.connecting: set[_Conn] = set()  # host-initiated, waiting for the guest's RESPONSE
        self.rr = 0                          # round-robin start among readable connections
        self.next_port = HOST_PORT_BASE
        self.negotiated = 0
        self.status = 0
        self.counts = VsockCounters()
        self.listener = self._listen(uds_path)

    # -- host listener -------------------------------------------------------------------

    @staticmethod
    def _listen(path: str) -> socket.socket:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
            s.listen(128)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        return s

    # -- VirtioDevice ----------------------------------------------------------------------

    def config(self) -> bytes:
        return VSOCK_CONFIG.pack(self.guest_cid)

    def set_features(self, features: int) -> None:
        self.negotiated = features
        log.info("vsock: features %s", features_str(features, VsockFeature))

    def set_status(self, status: int) -> None:
        if status == 0 and self.status:  # the driver reset the device: its sockets are gone
            self.drop_all()
        self.status = status

    def queue_role(self, index: int) -> str:
        return {VSOCK_RX: "rx", VSOCK_TX: "tx", VSOCK_EVENT: "event"}.get(index, f"q{index}")

    def service(self, queue: Queue) -> Service:
        if queue.index == VSOCK_RX:
            return _RxService(queue, self)
        if queue.index == VSOCK_TX:
            return _TxService(queue, self)
        return _EventService(queue, self)

    def reset(self) -> None:
        self.stop_queues()
        self.drop_all()
        self.status = 0

    def close(self) -> None:
        self.reset()
        with self.lock:
            for s, _, _ in self.pending.values():
                s.close()
            self.pending.clear()
        self.listener.close()
        try:
            if stat.S_ISSOCK(os.stat(self.uds_path).st_mode):
                os.unlink(self.uds_path)
        except OSError:
            pass

    def stats(self) -> dict[str, Any]:
        with self.lock:
            buffered = sum(c.out_bytes for c in self.conns.values())
            return {"guest_cid": self.guest_cid, "uds_path": self.uds_path, "buf_alloc": self.buf_alloc,
                    "vsock_connections": len(self.conns), "connecting_host_sockets": len(self.pending),
                    "buffered_to_host": buffered, "negotiated": features_str(self.negotiated, VsockFeature),
                    **self.counts.as_dict()}

    # -- connections -----------------------------------------------------------------------

    def drop_all(self) -> None:
        """Close every connection's host socket (the guest's end is gone)."""
        with self.lock:
            for c in list(self.conns.values()):
                self._close(c)
            self.ready.clear()
            self.rsts.clear()
        log.info("vsock: every connection dropped")

    def transport_reset(self) -> None:
        """Drop every connection and tell the guest (event queue): its
        sockets are reset, its listeners stay."""
        self.drop_all()
        with self.lock:
            self.events.append(VSOCK_EVENT_TRANSPORT_RESET)
        self._wake(VSOCK_EVENT)

    def _wake(self, index: int) -> None:
        loop = self.loops.get(index)
        if loop is not None:
            loop.wake()

    def _close(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        self.connecting.discard(c)
        self.conns.pop((c.host_port, c.guest_port), None)
        # shutdown first: the other loop may be polling this fd right now, and
        # its poll keeps the socket open after close() until it returns
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            c.sock.close()
        c.out.clear()
        self.wake_all()  # no loop keeps sleeping on the closed fd

    def _reset(self, c: _Conn, why: str) -> None:
        """End `c`: close the host socket and owe the guest an RST."""
        log.debug("vsock: reset %d<->%d: %s", c.host_port, c.guest_port, why)
        self._close(c)
        self._queue_rst(c.host_port, c.guest_port, known=True)

    def _queue_rst(self, host_port: int, guest_port: int, known: bool = False, cid: int = VSOCK_CID_HOST) -> None:
        if not known and len(self.rsts) >= MAX_PENDING_RST:
            self.counts.rst_dropped += 1
            return
        self.rsts.append((cid, host_port, guest_port))
        self._wake(VSOCK_RX)

    def _owe(self, c: _Conn, op: VsockOp, shut: int = 0) -> None:
        c.owed.add(op)
        c.shut_owed |= shut
        if not c.queued:
            c.queued = True
            self.ready.append(c)
        self._wake(VSOCK_RX)

    def _peer_update(self, c: _Conn, buf_alloc: int, fwd_cnt: int) -> None:
        before = c.peer_credit()
        c.peer_buf_alloc = buf_alloc
        c.peer_fwd_cnt = fwd_cnt
        if c.peer_credit() > 0:
            c.credit_asked = False
            if before == 0:
                self._wake(VSOCK_RX)  # its host socket may be read again

    def _new_host_port(self, guest_port: int) -> int:
        for _ in range(self.max_connections + 2):
            p = self.next_port
            self.next_port = HOST_PORT_BASE if p >= 0xFFFFFFFE else p + 1
            if (p, guest_port) not in self.conns:
                return p
        raise RuntimeError("no free host port")  # cannot happen: fewer connections than ports tried

    # -- the guest's packets (tx queue) -------------------------------------------------------

    def on_tx(self, chain: Chain) -> None:
        """One packet from the guest."""
        counts = self.counts
        if chain.readable_len < VSOCK_HDR_SIZE:
            counts.bad_packets += 1
            return
        hdr = chain.read(VSOCK_HDR_SIZE)
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = VSOCK_HDR.unpack(hdr)
        if dst_cid != VSOCK_CID_HOST and src_cid == self.guest_cid and op not in (VsockOp.RST, VsockOp.INVALID):
            # a peer that is not here (another VM's CID): refuse at once rather than let the guest time out
            counts.bad_packets += 1
            self._queue_rst(dst_port, src_port, cid=dst_cid & 0xFFFFFFFF)
            return
        if src_cid != self.guest_cid or dst_cid != VSOCK_CID_HOST or length > chain.readable_len - VSOCK_HDR_SIZE:
            counts.bad_packets += 1
            log.debug("vsock: packet %d:%d -> %d:%d (%d bytes) ignored", src_cid, src_port, dst_cid, dst_port,
                      length)
            return
        key = (dst_port, src_port)
        c = self.conns.get(key)
        if typ != VsockType.STREAM:
            counts.bad_packets += 1
            if op != VsockOp.RST:
                self._queue_rst(dst_port, src_port)
            return
        if op == VsockOp.REQUEST:
            if c is not None:
                self._reset(c, "a second REQUEST")
                return
            self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        if c is None:
            if op != VsockOp.RST:  # nothing to talk about: tell the guest so
                self._queue_rst(dst_port, src_port)
            return
        if op == VsockOp.RST:
            counts.resets_from_guest += 1
            if c.state == _Conn.CONNECTING:
                counts.host_refused += 1
            self._close(c)
            return
        self._peer_update(c, buf_alloc, fwd_cnt)
        if op == VsockOp.RW:
            if c.state != _Conn.CONNECTED:
                self._reset(c, "data before RESPONSE")
                return
            if length:
                self._from_guest(c, chain, length)
        elif op == VsockOp.RESPONSE:
            if c.state != _Conn.CONNECTING:
                self._reset(c, "unexpected RESPONSE")
                return
            c.state = _Conn.CONNECTED
            self.connecting.discard(c)
            counts.host_connects += 1
            line = f"OK {c.host_port}\n".encode()
            c.out.append(memoryview(line))
            c.out_bytes += len(line)
            c.preamble = len(line)
            self._flush(c)
        elif op == VsockOp.SHUTDOWN:
            c.guest_shut |= flags & _ALL_SHUT
            self._flush(c)  # half-closes or ends the connection once the bytes are out
        elif op == VsockOp.CREDIT_REQUEST:
            self._owe(c, VsockOp.CREDIT_UPDATE)
        elif op == VsockOp.CREDIT_UPDATE:
            pass  # the credit is in every header
        else:
            counts.bad_packets += 1
            self._reset(c, f"op {op}")

    def _guest_connect(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        path = f"{self.uds_path}_{host_port}"
        if len(self.conns) + len(self.pending) >= self.max_connections:
            log.info("vsock: guest port %d -> host port %d refused: %d connections", guest_port, host_port,
                        len(self.conns))
            self.counts.guest_refused += 1
            self._queue_rst(host_port, guest_port)
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            s.connect(path)
        except OSError as e:  # no such socket, nobody listening, backlog full (EAGAIN)
            s.close()
            log.debug("vsock: guest port %d -> %s: %s", guest_port, path, e)
            self.counts.guest_refused += 1
            self._queue_rst(host_port, guest_port)
            return
        c = _Conn(s, host_port, guest_port, _Conn.CONNECTED)
        c.peer_buf_alloc = buf_alloc
        c.peer_fwd_cnt = fwd_cnt
        self.conns[(host_port, guest_port)] = c
        self.counts.guest_connects += 1
        self._owe(c, VsockOp.RESPONSE)

    def _from_guest(self, c: _Conn, chain: Chain, length: int) -> None:
        """Payload for the host socket: written at once when it takes it,
        the rest kept (within the credit we gave)."""
        c.rx_cnt = (c.rx_cnt + length) & 0xFFFFFFFF
        if c.guest_shut & VsockShutdown.SEND:
            self._reset(c, "data after SHUTDOWN SEND")
            return
        if c.out_bytes - c.preamble + length > self.buf_alloc:
            self._reset(c, "the guest sent beyond its credit")
            return
        views = _views(chain.readable, VSOCK_HDR_SIZE, length)
        sent = 0
        if not c.out:
            try:
                sent = c.sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._reset(c, f"host socket: {e}")
                return
            self._forwarded(c, sent)
        if sent < length:  # keep the rest: a copy, the chain goes back to the guest
            rest = b"".join(_views(views, sent, length - sent))
            c.out.append(memoryview(rest))
            c.out_bytes += len(rest)

    def _forwarded(self, c: _Conn, n: int) -> None:
        """`n` guest bytes reached the host socket: advance fwd_cnt and give
        the guest credit back when its view of our free space runs low."""
        if n <= 0:
            return
        c.fwd_cnt = (c.fwd_cnt + n) & 0xFFFFFFFF
        self.counts.bytes_to_host += n
        in_flight = (c.rx_cnt - c.fwd_sent) & 0xFFFFFFFF  # what the guest thinks we still hold
        if 2 * (self.buf_alloc - in_flight) < self.buf_alloc:
            self._owe(c, VsockOp.CREDIT_UPDATE)

    def _flush(self, c: _Conn) -> bool:
        """Write what `c` holds to its host socket; then act on the guest's
        shutdown. Returns True if bytes moved."""
        moved = False
        out = c.out
        while out:
            head = out[0]
            try:
                n = c.sock.send(head)
            except BlockingIOError:
                break
            except OSError as e:
                self._reset(c, f"host socket: {e}")
                return moved
            moved = True
            c.out_bytes -= n
            ours = min(n, c.preamble)
            c.preamble -= ours
            self._forwarded(c, n - ours)
            if n == len(head):
                out.popleft()
            else:
                out[0] = head[n:]
                break
        if not out and c.guest_shut and not c.closed:
            if c.guest_shut == _ALL_SHUT:  # the guest closed: all its bytes are out, end it
                self._reset(c, "the guest closed")
            elif c.guest_shut & VsockShutdown.SEND and not c.host_wr_shut:
                c.host_wr_shut = True
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        return moved

    def flush_all(self) -> bool:
        """The tx loop's progress: host sockets that were full."""
        moved = False
        with self.lock:
            for c in [c for c in self.conns.values() if c.out]:
                moved |= self._flush(c)
        return moved

    def blocked_fds(self) -> list[int]:
        with self.lock:
            return [c.fd for c in self.conns.values() if c.out]

    # -- packets for the guest (rx queue) -------------------------------------------------------

    def _header(self, host_port: int, guest_port: int, op: int, length: int = 0, flags: int = 0,
                c: _Conn | None = None, cid: int = VSOCK_CID_HOST) -> bytes:
        if c is not None:
            c.fwd_sent = c.fwd_cnt
            return VSOCK_HDR.pack(VSOCK_CID_HOST, self.guest_cid, host_port, guest_port, length, VsockType.STREAM,
                                  op, flags, self.buf_alloc, c.fwd_cnt)
        return VSOCK_HDR.pack(cid, self.guest_cid, host_port, guest_port, length, VsockType.STREAM, op, flags, 0, 0)

    def rx_fill(self, held: deque[Chain], done: list[Completion]) -> bool:
        """Accept host connections, read CONNECT lines, then fill the held
        rx chains: RSTs, owed control packets, then host bytes round robin.
        Returns True if anything happened."""
        with self.lock:
            moved = self._accept()
            moved |= self._read_connect_lines()
            if self.connecting:
                moved |= self._expire_connects()
            k = len(done)
            # buffers too small for a header: back to the guest empty
            while held and held[0].writable_len < VSOCK_HDR_SIZE:
                done.append((held.popleft(), 0))
            while held and self.rsts:
                cid, hp, gp = self.rsts.popleft()
                ch = held.popleft()
                done.append((ch, ch.write(self._header(hp, gp, VsockOp.RST, cid=cid))))
                self.counts.resets_to_guest += 1
            ready = self.ready
            while held and ready:
                c = ready[0]
                while held and c.owed and not c.closed:
                    op = next(o for o in _OWED_ORDER if o in c.owed)
                    c.owed.discard(op)
                    flags = 0
                    if op == VsockOp.SHUTDOWN:
                        flags, c.shut_owed = c.shut_owed, 0
                    elif op == VsockOp.CREDIT_UPDATE:
                        self.counts.credit_updates += 1
                    elif op == VsockOp.CREDIT_REQUEST:
                        self.counts.credit_requests += 1
                    ch = held.popleft()
                    done.append((ch, ch.write(self._header(c.host_port, c.guest_port, op, 0, flags, c))))
                if c.owed and not c.closed:
                    break  # out of buffers; it stays first
                ready.popleft()
                c.queued = False
            if held:
                self._read_hosts(held, done)
            return moved or len(done) > k

    def _readable(self) -> list[_Conn]:
        """Connections whose host socket may be read now: connected, the
        guest still receives and has credit, bytes (or EOF) waiting."""
        cands = [c for c in self.conns.values()
                 if c.state == _Conn.CONNECTED and not c.host_eof and not c.guest_shut & VsockShutdown.RCV
                 and VsockOp.RESPONSE not in c.owed and c.peer_credit() > 0]
        if not cands:
            return []
        p = select.poll()
        for c in cands:
            p.register(c.fd, select.POLLIN)
        ready = {fd for fd, _ in p.poll(0)}
        return [c for c in cands if c.fd in ready]

    def _read_hosts(self, held: deque[Chain], done: list[Completion]) -> None:
        conns = self._readable()
        if not conns:
            return
        self.rr = (self.rr + 1) % len(conns)
        conns = conns[self.rr:] + conns[:self.rr]
        budget = FILL_PER_PASS
        while held and conns and budget > 0:
            still = []
            for c in conns:
                if not held or budget <= 0:
                    break
                if c.closed:
                    continue
                ch = held[0]
                room = min(ch.writable_len - VSOCK_HDR_SIZE, c.peer_credit(), MAX_PAYLOAD)
                if room <= 0:
                    if ch.writable_len == VSOCK_HDR_SIZE:  # a header-only buffer: good for control packets only
                        done.append((held.popleft(), 0))
                    continue
                try:
                    n = c.sock.recvmsg_into(_views(ch.writable, VSOCK_HDR_SIZE, room))[0]
                except BlockingIOError:
                    continue
                except OSError as e:
                    self._reset(c, f"host socket: {e}")
                    continue
                if n == 0:  # the host half-closed: no more bytes from this side
                    c.host_eof = True
                    self._owe(c, VsockOp.SHUTDOWN, int(VsockShutdown.SEND))
                    continue
                held.popleft()
                ch.write(self._header(c.host_port, c.guest_port, VsockOp.RW, n, 0, c))
                done.append((ch, VSOCK_HDR_SIZE + n))
                c.tx_cnt = (c.tx_cnt + n) & 0xFFFFFFFF
                self.counts.bytes_to_guest += n
                budget -= 1
                if c.peer_credit() == 0:
                    if not c.credit_asked:  # out of credit: ask, in case the guest's update is slow
                        c.credit_asked = True
                        self._owe(c, VsockOp.CREDIT_REQUEST)
                    continue
                if n == room:
                    still.append(c)
            conns = still
        # control packets owed on the way (SHUTDOWN after EOF) go out with the next pass

    def _expire_connects(self) -> bool:
        now = time.monotonic()
        late = [c for c in self.connecting if c.deadline <= now]
        for c in late:
            log.info("vsock: host CONNECT %d: no answer from the guest in %gs", c.guest_port, self.connect_timeout)
            self.counts.host_refused += 1
            self._reset(c, "no answer to REQUEST")  # the RST makes the guest forget a late REQUEST
        return bool(late)

    def rx_timer(self) -> float | None:
        """Seconds until the next host CONNECT (its line, or the guest's
        answer) times out (None: none waits)."""
        with self.lock:
            if not self.connecting and not self.pending:
                return None
            first = min([c.deadline for c in self.connecting] + [p[2] for p in self.pending.values()])
            return max(0.0, first - time.monotonic())

    def rx_wake_fds(self, holding: bool) -> list[int]:
        with self.lock:
            fds = [self.listener.fileno(), *self.pending]
            if holding:
                fds.extend(c.fd for c in self.conns.values()
                           if c.state == _Conn.CONNECTED and not c.host_eof
                           and not c.guest_shut & VsockShutdown.RCV and c.peer_credit() > 0)
            return fds

    def rx_has_work(self) -> bool:
        with self.lock:
            return bool(self.rsts or self.ready)

    # -- host-initiated connections --------------------------------------------------------------

    def _accept(self) -> bool:
        moved = False
        for _ in range(64):
            try:
                s, _addr = self.listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("vsock: accept on %s: %s", self.uds_path, e)
                break
            moved = True
            if len(self.conns) + len(self.pending) >= self.max_connections:
                log.info("vsock: host connection refused: %d connections", len(self.conns))
                self.counts.host_refused += 1
                s.close()
                continue
            s.setblocking(False)
            self.pending[s.fileno()] = (s, bytearray(), time.monotonic() + self.connect_timeout)
        return moved

    def _read_connect_lines(self) -> bool:
        moved = False
        now = time.monotonic()
        for fd, (s, line, deadline) in list(self.pending.items()):
            if deadline <= now:
                self._refuse_line(fd, s, line)
                moved = True
                continue
            try:
                peek = s.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError:
                peek = b""
            moved = True
            nl = peek.find(b"\n")
            try:
                got = s.recv(nl + 1 if nl >= 0 else len(peek))  # never a byte past the line
            except OSError:
                got = b""
            line += got
            if not peek:
                del self.pending[fd]
                s.close()
                continue
            if nl < 0:
                if len(line) >= CONNECT_LINE_MAX:
                    self._refuse_line(fd, s, line)
                continue
            del self.pending[fd]
            words = line.decode("ascii", "replace").split()
            if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit() \
                    or int(words[1]) > 0xFFFFFFFF:
                self._refuse_line(fd, s, line)
                continue
            guest_port = int(words[1])
            c = _Conn(s, self._new_host_port(guest_port), guest_port, _Conn.CONNECTING)
            c.deadline = time.monotonic() + self.connect_timeout
            self.connecting.add(c)
            self.conns[(c.host_port, guest_port)] = c
            self._owe(c, VsockOp.REQUEST)
        return moved

    def _refuse_line(self, fd: int, s: socket.socket, line: bytearray) -> None:
        log.info("vsock: bad line from a host program: %r", bytes(line[:CONNECT_LINE_MAX]))
        self.counts.host_refused += 1
        self.pending.pop(fd, None)
        s.close()


# --- queue services ---------------------------------------------------------------------------


class _RxService(Service):
    """Packets to the guest: holds the guest's rx buffers and fills them
    (control packets first, then host bytes). It takes buffers while it
    holds fewer than `HOLD`; asleep it waits for the kick (when it wants
    buffers), the host listener, host sockets still sending their CONNECT
    line, and (holding buffers) host sockets the guest has credit for."""

    HOLD = 256

    def __init__(self, queue: Queue, device: VsockDevice) -> None:
        super().__init__(queue)
        self.device = device
        self.batch = device.batch
        self.held: deque[Chain] = deque()

    def take(self) -> int:
        if not self.queue.enabled:
            return 0
        return self.batch if len(self.held) < self.HOLD else 0

    def handle(self, chains: list[Chain], done: list[Completion]) -> None:
        self.held.extend(chains)
        k = len(done)
        self.device.rx_fill(self.held, done)
        self.queue.counters.packets += len(done) - k

    def progress(self, done: list[Completion]) -> bool:
        if not self.queue.enabled:
            return False
        k = len(done)
        moved = self.device.rx_fill(self.held, done)
        self.queue.counters.packets += len(done) - k
        return moved

    def wake_fds(self) -> list[int]:
        return self.device.rx_wake_fds(bool(self.held))

    def before_sleep(self) -> bool:
        return bool(self.held) and self.device.rx_has_work()

    def timer(self) -> float | None:
        return self.device.rx_timer()

    def stopped(self) -> None:
        self.held.clear()  # never written: offered again when the ring restarts


class _TxService(Service):
    """Packets from the guest: every chain is read and answered at once
    (payload the host socket does not take is copied and kept, within the
    credit); asleep it also waits for full host sockets to take more."""

    def __init__(self, queue: Queue, device: VsockDevice) -> None:
        super().__init__(queue)
        self.device = device
        self.batch = device.batch

    def take(self) -> int:
        return self.batch if self.queue.enabled else 0

    def handle(self, chains: list[Chain], done: list[Completion]) -> None:
        dev = self.device
        c = self.queue.counters
        with dev.lock:
            for ch in chains:
                dev.on_tx(ch)
                done.append((ch, 0))
        c.packets += len(chains)
        c.bytes += sum(ch.readable_len for ch in chains) - VSOCK_HDR_SIZE * len(chains)

    def progress(self, done: list[Completion]) -> bool:
        return self.device.flush_all()

    def wake_write_fds(self) -> list[int]:
        return self.device.blocked_fds()


class _EventService(Service):
    """The event queue: buffers are held until the device has an event."""

    HOLD = 16

    def __init__(self, queue: Queue, device: VsockDevice) -> None:
        super().__init__(queue)
        self.device = device
        self.held: deque[Chain] = deque()

    def take(self) -> int:
        return self.HOLD - len(self.held) if self.queue.enabled and len(self.held) < self.HOLD else 0

    def handle(self, chains: list[Chain], done: list[Completion]) -> None:
        self.held.extend(chains)
        self.progress(done)

    def progress(self, done: list[Completion]) -> bool:
        dev = self.device
        moved = False
        with dev.lock:
            while self.held and dev.events:
                ch = self.held.popleft()
                done.append((ch, ch.write(VSOCK_EVENT_ID.pack(dev.events.popleft()))))
                moved = True
        return moved

    def stopped(self) -> None:
        self.held.clear()


__all__ = ["DEFAULT_BUF_ALLOC", "VsockCounters", "VsockDevice"]
