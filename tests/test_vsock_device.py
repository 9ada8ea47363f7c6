"""virtio-vsock over vhost-user: `pyvirtio vsock` as a child process, and
this test as the guest's vsock driver (tests/vhost_client.py's front-end,
memfd guest memory, rx buffers of a 44-byte header and 4 KiB as Linux
posts them) with host programs on the Unix sockets.

Proves: connections both ways (`HOST_SOCK_N`, `CONNECT N` / `OK <port>`),
checksummed bytes in order, credit exhaustion and recovery in both
directions, the device's buffer for a slow host reader bounded by its
`buf_alloc`, a slow reader not stalling another connection, RST and
SHUTDOWN both ways, many connections at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.spec import VSOCK_CID_HOST, VSOCK_HDR, VSOCK_HDR_SIZE, VsockOp, VsockShutdown, VsockType
from pyvirtio.vhost_user import Config, Request
from vhost_client import NetFrontend

KiB = 1 << 10
MiB = 1 << 20
CID = 3
DEVICE_BUF_ALLOC = 64 * KiB


# --- the back-end ------------------------------------------------------------------------------


class Backend:
    def __init__(self, sock: Path, uds: Path, stats: Path, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.uds = uds
        self.stats_path = stats
        self.proc = proc

    def host_path(self, port: int) -> str:
        return f"{self.uds}_{port}"

    def stats(self) -> dict[str, object]:
        """The device counters now (SIGUSR1: one JSON line in the stats file)."""
        n = len(self.stats_path.read_text().splitlines()) if self.stats_path.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = self.stats_path.read_text().splitlines() if self.stats_path.exists() else []
            if len(lines) > n:
                line: dict[str, object] = json.loads(lines[-1])
                return line
            time.sleep(0.01)
        raise AssertionError("no stats line")


@contextlib.contextmanager
def vsock_backend(*extra: str) -> Iterator[Backend]:
    """`pyvirtio vsock` with its sockets in a short temporary directory
    (Unix socket paths are at most 107 bytes); stopped by pid, must exit 0."""
    d = Path(tempfile.mkdtemp(prefix="pvvs-"))
    sock, uds, stats = d / "vu.sock", d / "h.sock", d / "stats.jsonl"
    logf = open(d / "vsock.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "-v", "vsock", "--socket-path", str(sock),
                             "--guest-cid", str(CID), "--uds-path", str(uds), "--buf-alloc", str(DEVICE_BUF_ALLOC),
                             "--stats-file", str(stats), *extra], stdout=logf, stderr=subprocess.STDOUT)
    rc = None
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and uds.exists()):
            assert proc.poll() is None, (d / "vsock.log").read_text()
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.02)
        yield Backend(sock, uds, stats, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        logf.close()
        text = (d / "vsock.log").read_text()
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0, text
    assert "Traceback" not in text, text


# --- the guest's vsock driver --------------------------------------------------------------------


class GConn:
    """The guest's end of one connection."""

    def __init__(self, host_port: int, guest_port: int, buf_alloc: int) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.buf_alloc = buf_alloc
        self.state = "connecting"
        self.data = bytearray()       # received, not consumed yet
        self.fwd_cnt = 0              # consumed
        self.fwd_sent = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_shut = 0
        self.ops: list[VsockOp] = []  # every op received

    def credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


class VsockGuest:
    """Drives rx (0) and tx (1) as Linux's virtio_transport does."""

    def __init__(self, sock: Path, buf_alloc: int = 64 * KiB, rx_buffers: int = 64, rx_size: int = 4096,
                 packed: bool = False) -> None:
        self.fe = NetFrontend(str(sock), packed=packed, queue_size=128, mem_size=16 * MiB)
        self.buf_alloc = buf_alloc
        self.conns: dict[tuple[int, int], GConn] = {}
        self.listening: set[int] = set()
        self.accepted: list[GConn] = []
        self.unknown: list[tuple[VsockOp, int, int]] = []  # packets for no connection
        self.other_cids: list[tuple[VsockOp, int, int, int]] = []  # packets not from the host
        self.next_port = 50000
        fe = self.fe
        fe.negotiate()
        fe.setup_ring(0)
        fe.setup_ring(1)
        rx = fe.rings[0].driver
        for _ in range(rx_buffers):
            h, b = fe.pool.alloc(VSOCK_HDR_SIZE), fe.pool.alloc(rx_size)
            rx.add([], [(h, VSOCK_HDR_SIZE), (b, rx_size)], (h, b, rx_size))
        if rx.publish():
            fe.kick(0)

    def close(self) -> None:
        self.fe.close()

    # -- packets --------------------------------------------------------------------------------

    def send_pkt(self, host_port: int, guest_port: int, op: VsockOp, payload: bytes = b"", flags: int = 0,
                 conn: GConn | None = None, typ: int = VsockType.STREAM, src_cid: int = CID,
                 dst_cid: int = VSOCK_CID_HOST) -> None:
        fe = self.fe
        tx = fe.rings[1].driver
        deadline = time.monotonic() + 10
        while tx.num_free < 2:
            self._reap_tx()
            assert time.monotonic() < deadline, "tx ring stuck"
            time.sleep(0.0005)
        fwd = 0
        if conn is not None:
            fwd = conn.fwd_sent = conn.fwd_cnt
        hdr = VSOCK_HDR.pack(src_cid, dst_cid, guest_port, host_port, len(payload), typ, op, flags,
                             self.buf_alloc, fwd)
        g1 = fe.pool.alloc(VSOCK_HDR_SIZE)
        fe.mem.mem.write(g1, hdr)
        out = [(g1, VSOCK_HDR_SIZE)]
        if payload:
            g2 = fe.pool.alloc(len(payload))
            fe.mem.mem.write(g2, payload)
            out.append((g2, len(payload)))
        tx.add(out, [], [g for g, _ in out])
        if tx.publish():
            fe.kick(1)

    def _reap_tx(self) -> None:
        for tok, _ in self.fe.rings[1].driver.get_used():
            assert isinstance(tok, list)
            for g in tok:
                self.fe.pool.free(g)

    def pump(self, timeout: float = 0.0) -> int:
        """Take what the device put in rx (waiting up to `timeout` for the first packet)."""
        fe = self.fe
        rx = fe.rings[0].driver
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            self._reap_tx()
            used = rx.get_used()
            for tok, written in used:
                assert isinstance(tok, tuple)
                h, b, size = tok
                assert written >= VSOCK_HDR_SIZE
                hdr = VSOCK_HDR.unpack(fe.mem.mem.read(h, VSOCK_HDR_SIZE))
                payload = fe.mem.mem.read(b, written - VSOCK_HDR_SIZE) if written > VSOCK_HDR_SIZE else b""
                rx.add([], [(h, VSOCK_HDR_SIZE), (b, size)], tok)
                self._packet(hdr, payload)
            if used:
                n += len(used)
                if rx.publish():
                    fe.kick(0)
                continue
            if n or time.monotonic() >= deadline:
                return n
            time.sleep(0.0005)

    def _packet(self, hdr: tuple[int, ...], payload: bytes) -> None:
        src_cid, dst_cid, sp, dp, length, typ, op_, flags, buf_alloc, fwd_cnt = hdr
        op = VsockOp(op_)
        assert (dst_cid, typ) == (CID, VsockType.STREAM)
        assert length == len(payload)
        if src_cid != VSOCK_CID_HOST:
            self.other_cids.append((VsockOp(op_), src_cid, sp, dp))
            return
        key = (sp, dp)
        c = self.conns.get(key)
        if op == VsockOp.REQUEST:
            if dp in self.listening and c is None:
                c = GConn(sp, dp, self.buf_alloc)
                c.state = "connected"
                c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
                self.conns[key] = c
                self.accepted.append(c)
                self.send_pkt(sp, dp, VsockOp.RESPONSE, conn=c)
            else:
                self.send_pkt(sp, dp, VsockOp.RST)
            return
        if c is None:
            self.unknown.append((op, sp, dp))
            return
        c.ops.append(op)
        c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == VsockOp.RESPONSE:
            assert c.state == "connecting"
            c.state = "connected"
        elif op == VsockOp.RW:
            c.data += payload
            assert len(c.data) <= c.buf_alloc, "the device sent beyond the guest's credit"
        elif op == VsockOp.RST:
            c.state = "reset"
            del self.conns[key]
        elif op == VsockOp.SHUTDOWN:
            c.peer_shut |= flags
        elif op == VsockOp.CREDIT_REQUEST:
            self.send_pkt(sp, dp, VsockOp.CREDIT_UPDATE, conn=c)

    # -- sockets -----------------------------------------------------------------------------------

    def connect(self, port: int, timeout: float = 5.0) -> GConn:
        gp = self.next_port
        self.next_port += 1
        c = GConn(port, gp, self.buf_alloc)
        self.conns[(port, gp)] = c
        self.send_pkt(port, gp, VsockOp.REQUEST, conn=c)
        self.wait(lambda: c.state != "connecting", timeout)
        return c

    def wait(self, cond: Callable[[], bool], timeout: float = 5.0, host: Callable[[], object] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            self.pump(0.002)
            if host is not None:
                host()

    def write_some(self, c: GConn, data: memoryview) -> int:
        """Send what the device's credit allows (4 KiB packets, as Linux); returns bytes sent."""
        sent = 0
        while sent < len(data) and c.state == "connected":
            n = min(4096, c.credit(), len(data) - sent)
            if n <= 0:
                break
            self.send_pkt(c.host_port, c.guest_port, VsockOp.RW, bytes(data[sent:sent + n]), conn=c)
            c.tx_cnt += n
            sent += n
        return sent

    def read(self, c: GConn, limit: int | None = None) -> bytes:
        """The application reads: consume bytes; credit back once half the buffer was consumed."""
        n = len(c.data) if limit is None else min(limit, len(c.data))
        out = bytes(c.data[:n])
        del c.data[:n]
        c.fwd_cnt += n
        if n and c.state == "connected" and 2 * (c.fwd_cnt - c.fwd_sent) >= c.buf_alloc:
            self.send_pkt(c.host_port, c.guest_port, VsockOp.CREDIT_UPDATE, conn=c)
        return out


@contextlib.contextmanager
def guest(backend: Backend, **kw: Any) -> Iterator[VsockGuest]:
    g = VsockGuest(backend.sock, **kw)
    try:
        yield g
    finally:
        g.close()


@contextlib.contextmanager
def host_listener(path: str) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    try:
        yield s
    finally:
        s.close()
        Path(path).unlink(missing_ok=True)


def accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket:
    listener.settimeout(timeout)
    s, _ = listener.accept()
    s.setblocking(False)
    return s


def host_connect(backend: Backend, g: VsockGuest, port: int, timeout: float = 5.0) -> tuple[socket.socket, GConn]:
    """A host program connects to the guest's listener on `port`: `CONNECT`, then `OK <port>`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(backend.uds))
    s.sendall(f"CONNECT {port}\n".encode())
    s.setblocking(False)
    before = len(g.accepted)
    g.wait(lambda: len(g.accepted) > before, timeout)
    c = g.accepted[-1]
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        g.pump(0.002)
        with contextlib.suppress(BlockingIOError):
            b = s.recv(1)
            assert b, "closed before OK"
            line += b
        assert time.monotonic() < deadline, "no OK line"
    assert line == f"OK {c.host_port}\n".encode()
    return s, c


def transfer(g: VsockGuest, pairs: list[tuple[socket.socket, GConn, bytes, bytes]], timeout: float = 60.0) -> None:
    """Move `to_guest` from each host socket to its guest end and `to_host`
    the other way, at once; every byte checked (sha256) on arrival."""
    state = []
    for s, c, to_guest, to_host in pairs:
        state.append({"s": s, "c": c, "tg": memoryview(to_guest), "th": memoryview(to_host), "hs": 0, "gs": 0,
                      "got_g": bytearray(), "got_h": bytearray()})
    deadline = time.monotonic() + timeout
    while True:
        busy = False
        g.pump(0)
        for st in state:
            s, c = st["s"], st["c"]
            if st["hs"] < len(st["tg"]):
                with contextlib.suppress(BlockingIOError):
                    st["hs"] += s.send(st["tg"][st["hs"]:st["hs"] + 256 * KiB])
                    busy = True
            if st["gs"] < len(st["th"]):
                k = g.write_some(c, st["th"][st["gs"]:])
                st["gs"] += k
                busy |= k > 0
            if c.data:
                st["got_g"] += g.read(c)
                busy = True
            with contextlib.suppress(BlockingIOError):
                d = s.recv(256 * KiB)
                st["got_h"] += d
                busy |= bool(d)
        if all(len(st["got_g"]) >= len(st["tg"]) and len(st["got_h"]) >= len(st["th"]) for st in state):
            break
        assert time.monotonic() < deadline, [(len(st["got_g"]), len(st["got_h"])) for st in state]
        if not busy:
            g.pump(0.001)
    for st in state:
        assert hashlib.sha256(st["got_g"]).digest() == hashlib.sha256(st["tg"]).digest()
        assert hashlib.sha256(st["got_h"]).digest() == hashlib.sha256(st["th"]).digest()


def drain_host(s: socket.socket, want: int, g: VsockGuest, timeout: float = 10.0) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < want:
        g.pump(0.001)
        with contextlib.suppress(BlockingIOError):
            d = s.recv(want - len(got))
            assert d, "EOF"
            got += d
        assert time.monotonic() < deadline, f"{len(got)} of {want}"
    return bytes(got)


def eof(s: socket.socket, g: VsockGuest, timeout: float = 5.0) -> bool:
    """True once the host socket reads end-of-file (or a reset)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        g.pump(0.002)
        try:
            if s.recv(65536) == b"":
                return True
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return True
    return False


def data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- tests ---------------------------------------------------------------------------------------


def test_print_capabilities_names_the_vhost_user_vsock_type() -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirtio", "vsock", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    assert out == '{"type": "vsock"}\n'


def test_config_space_holds_the_guest_cid() -> None:
    with vsock_backend() as b, guest(b) as g:
        c = g.fe.client.call(Request.GET_CONFIG, Config(0, 8, 0, bytes(8)))
        assert isinstance(c.body, Config)
        assert int.from_bytes(c.body.payload, "little") == CID


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_connects_to_host_port_socket_and_bytes_flow_both_ways_intact(packed: bool) -> None:
    with vsock_backend() as b, guest(b, packed=packed) as g, host_listener(b.host_path(1234)) as lst:
        c = g.connect(1234)
        assert c.state == "connected" and c.peer_buf_alloc == DEVICE_BUF_ALLOC
        s = accept(lst)
        try:
            transfer(g, [(s, c, data(1 * MiB, 1), data(1 * MiB, 2))])
        finally:
            s.close()


def test_host_connect_line_reaches_guest_listener_answered_ok_with_the_host_port() -> None:
    with vsock_backend() as b, guest(b) as g:
        g.listening.add(5000)
        s, c = host_connect(b, g, 5000)
        try:
            assert c.guest_port == 5000 and c.host_port >= 1024
            transfer(g, [(s, c, data(512 * KiB, 3), data(512 * KiB, 4))])
        finally:
            s.close()


def test_host_bytes_sent_with_the_connect_line_wait_for_the_guest() -> None:
    with vsock_backend() as b, guest(b) as g:
        g.listening.add(5001)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(b.uds))
            s.sendall(b"CONNECT 5001\nearly bytes")
            g.wait(lambda: bool(g.accepted))
            c = g.accepted[0]
            g.wait(lambda: bytes(c.data) == b"early bytes")
            s.settimeout(5)
            assert s.recv(100) == f"OK {c.host_port}\n".encode()
        finally:
            s.close()


def test_guest_connect_to_port_without_host_socket_is_reset() -> None:
    with vsock_backend() as b, guest(b) as g:
        c = g.connect(4321)
        assert c.state == "reset"


def test_host_connect_to_port_guest_does_not_listen_on_is_closed_without_ok() -> None:
    with vsock_backend() as b, guest(b) as g:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(b.uds))
            s.sendall(b"CONNECT 7777\n")
            s.setblocking(False)
            assert eof(s, g)
        finally:
            s.close()


@pytest.mark.parametrize("line", [b"HELLO 1\n", b"CONNECT x\n", b"CONNECT " + b"9" * 40])
def test_bad_connect_line_closes_the_host_socket(line: bytes) -> None:
    with vsock_backend() as b, guest(b) as g:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(b.uds))
            s.sendall(line)
            s.setblocking(False)
            assert eof(s, g)
            assert g.accepted == [] and g.unknown == []
        finally:
            s.close()


def test_guest_without_credit_gets_nothing_until_it_gives_credit_back() -> None:
    with vsock_backend() as b, guest(b, buf_alloc=16 * KiB) as g:
        g.listening.add(6000)
        s, c = host_connect(b, g, 6000)
        try:
            blob = data(100 * KiB, 5)
            s.setblocking(True)
            s.settimeout(10)
            s.sendall(blob)  # the host socket holds what the guest has no credit for
            g.wait(lambda: len(c.data) == 16 * KiB)
            t = time.monotonic() + 0.3
            while time.monotonic() < t:
                g.pump(0.01)
            assert len(c.data) == 16 * KiB  # never beyond the credit (pump asserts it per packet too)
            assert VsockOp.CREDIT_REQUEST in c.ops  # the device asked for credit
            got = bytearray()
            g.wait(lambda: (got.extend(g.read(c)), len(got) == len(blob))[1], timeout=10)
            assert bytes(got) == blob
        finally:
            s.close()


def test_slow_host_reader_holds_at_most_buf_alloc_then_recovers() -> None:
    with vsock_backend() as b, guest(b) as g, host_listener(b.host_path(1500)) as lst:
        c = g.connect(1500)
        s = accept(lst)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            blob = data(2 * MiB, 6)
            sent = 0
            for _ in range(200):  # the host does not read: the guest runs out of credit
                sent += g.write_some(c, memoryview(blob)[sent:])
                g.pump(0.005)
            assert 0 < sent < len(blob) and c.credit() == 0
            held = b.stats()["buffered_to_host"]
            assert isinstance(held, int) and 0 < held <= DEVICE_BUF_ALLOC
            got = bytearray()

            def host() -> None:
                with contextlib.suppress(BlockingIOError):
                    got.extend(s.recv(1 * MiB))

            def progress() -> bool:
                nonlocal sent
                sent += g.write_some(c, memoryview(blob)[sent:])
                return len(got) == len(blob)

            g.wait(progress, timeout=30, host=host)  # the host reads: CREDIT_UPDATEs let the guest go on
            assert bytes(got) == blob
            assert VsockOp.CREDIT_UPDATE in c.ops
        finally:
            s.close()


def test_slow_host_reader_does_not_stall_another_connection() -> None:
    with (vsock_backend() as b, guest(b) as g, host_listener(b.host_path(1600)) as l1,
          host_listener(b.host_path(1601)) as l2):
        slow, fast = g.connect(1600), g.connect(1601)
        s1, s2 = accept(l1), accept(l2)
        try:
            stuck = data(1 * MiB, 7)
            sent = 0
            for _ in range(100):
                sent += g.write_some(slow, memoryview(stuck)[sent:])
                g.pump(0.002)
            assert slow.credit() == 0  # blocked on its host reader
            g.listening.add(6100)
            t0 = time.monotonic()
            transfer(g, [(s2, fast, data(1 * MiB, 8), data(1 * MiB, 9))])
            assert time.monotonic() - t0 < 30
        finally:
            s1.close()
            s2.close()


def test_guest_shutdown_send_half_closes_then_guest_close_is_answered_with_rst() -> None:
    with vsock_backend() as b, guest(b) as g, host_listener(b.host_path(1700)) as lst:
        c = g.connect(1700)
        s = accept(lst)
        try:
            g.write_some(c, memoryview(b"last words"))
            g.send_pkt(c.host_port, c.guest_port, VsockOp.SHUTDOWN, flags=VsockShutdown.SEND, conn=c)
            assert drain_host(s, 10, g) == b"last words"
            assert eof(s, g)  # half-closed: EOF after the bytes
            s.setblocking(True)
            s.sendall(b"reply")  # the other direction still works
            s.setblocking(False)
            g.wait(lambda: bytes(c.data) == b"reply")
            g.send_pkt(c.host_port, c.guest_port, VsockOp.SHUTDOWN, flags=VsockShutdown.RCV | VsockShutdown.SEND,
                       conn=c)
            g.wait(lambda: c.state == "reset")  # a clean close ends with the device's RST
            assert b.stats()["vsock_connections"] == 0
        finally:
            s.close()


def test_host_half_close_reaches_guest_as_shutdown_send_and_guest_can_still_send() -> None:
    with vsock_backend() as b, guest(b) as g:
        g.listening.add(6200)
        s, c = host_connect(b, g, 6200)
        try:
            s.setblocking(True)
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            s.setblocking(False)
            g.wait(lambda: c.peer_shut & VsockShutdown.SEND != 0)
            assert bytes(c.data) == b"request"  # the bytes came before the SHUTDOWN
            g.write_some(c, memoryview(b"response"))
            assert drain_host(s, 8, g) == b"response"
        finally:
            s.close()


def test_host_close_while_guest_sends_resets_the_guest() -> None:
    with vsock_backend() as b, guest(b) as g, host_listener(b.host_path(1800)) as lst:
        c = g.connect(1800)
        s = accept(lst)
        s.close()
        g.wait(lambda: c.peer_shut != 0 or c.state == "reset")  # EOF: SHUTDOWN SEND first
        blob = memoryview(data(4 * KiB, 10))

        def sending_until_reset() -> bool:
            g.write_some(c, blob)  # the guest goes on writing: the device's write fails
            return c.state == "reset"

        g.wait(sending_until_reset)
        g.wait(lambda: b.stats()["vsock_connections"] == 0)


def test_guest_rst_closes_the_host_socket() -> None:
    with vsock_backend() as b, guest(b) as g, host_listener(b.host_path(1900)) as lst:
        c = g.connect(1900)
        s = accept(lst)
        try:
            g.send_pkt(c.host_port, c.guest_port, VsockOp.RST, conn=c)
            assert eof(s, g)
            g.wait(lambda: b.stats()["vsock_connections"] == 0)
        finally:
            s.close()


def test_packets_for_no_connection_and_other_socket_types_are_answered_with_rst() -> None:
    with vsock_backend() as b, guest(b) as g:
        g.send_pkt(2000, 60000, VsockOp.RW, b"stray")
        g.send_pkt(2000, 60001, VsockOp.REQUEST, typ=VsockType.SEQPACKET)
        g.send_pkt(2000, 60002, VsockOp.REQUEST, src_cid=CID + 1)  # not this guest: ignored
        g.send_pkt(2000, 60003, VsockOp.REQUEST, dst_cid=7)  # a CID that is not the host: refused by "CID 7"
        g.wait(lambda: len(g.unknown) >= 2 and len(g.other_cids) >= 1)
        g.pump(0.2)
        assert sorted(g.unknown) == [(VsockOp.RST, 2000, 60000), (VsockOp.RST, 2000, 60001)]
        assert g.other_cids == [(VsockOp.RST, 7, 2000, 60003)]


def test_many_connections_both_ways_at_once() -> None:
    n = 12
    with vsock_backend() as b, guest(b) as g, contextlib.ExitStack() as stack:
        pairs = []
        for i in range(n):
            lst = stack.enter_context(host_listener(b.host_path(3000 + i)))
            c = g.connect(3000 + i)
            s = accept(lst)
            stack.callback(s.close)
            pairs.append((s, c, data(64 * KiB, 100 + i), data(64 * KiB, 200 + i)))
        for i in range(n):
            g.listening.add(7000 + i)
            s, c = host_connect(b, g, 7000 + i)
            stack.callback(s.close)
            pairs.append((s, c, data(64 * KiB, 300 + i), data(64 * KiB, 400 + i)))
        assert len({(c.host_port, c.guest_port) for _, c, _, _ in pairs}) == 2 * n
        transfer(g, pairs)
        assert b.stats()["vsock_connections"] == 2 * n


def test_counters_are_printed_at_exit() -> None:
    with vsock_backend() as b:
        with guest(b) as g, host_listener(b.host_path(1234)) as lst:
            c = g.connect(1234)
            s = accept(lst)
            transfer(g, [(s, c, b"x" * 1000, b"y" * 2000)])
            s.close()
        stats_path = b.stats_path
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(15) == 0
        last = json.loads(stats_path.read_text().splitlines()[-1])
    assert last["event"] == "exit"
    assert last["bytes_to_host"] == 2000 and last["bytes_to_guest"] == 1000
    assert last["guest_connects"] == 1


def test_host_connect_the_guest_never_answers_is_closed_after_connect_timeout() -> None:
    with vsock_backend("--connect-timeout", "0.5") as b, guest(b) as g:
        seen: list[tuple[int, ...]] = []
        g._packet = lambda hdr, payload: seen.append(hdr)  # type: ignore[method-assign]  # a guest that never answers
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(b.uds))
            s.sendall(b"CONNECT 5555\n")
            s.setblocking(False)
            t0 = time.monotonic()
            assert eof(s, g, timeout=5)
            assert 0.4 < time.monotonic() - t0 < 3
            g.wait(lambda: len(seen) >= 2)
            assert [VsockOp(h[6]) for h in seen] == [VsockOp.REQUEST, VsockOp.RST]  # the guest forgets it
            assert seen[0][2:4] == seen[1][2:4] and seen[0][3] == 5555
        finally:
            s.close()


def test_connections_beyond_max_connections_are_refused_both_ways() -> None:
    with (vsock_backend("--max-connections", "2") as b, guest(b) as g, host_listener(b.host_path(2100)) as lst):
        g.listening.add(6300)
        c1 = g.connect(2100)
        s1 = accept(lst)
        s2, c2 = host_connect(b, g, 6300)
        try:
            assert g.connect(2100).state == "reset"  # a third from the guest
            s3 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a third from the host
            with s3:
                s3.connect(str(b.uds))
                s3.setblocking(False)
                assert eof(s3, g)
            transfer(g, [(s1, c1, b"one" * 1000, b"two" * 1000), (s2, c2, b"three" * 1000, b"four" * 1000)])
        finally:
            s1.close()
            s2.close()


def test_slow_guest_reader_does_not_stall_another_host_connection() -> None:
    with vsock_backend() as b, guest(b, buf_alloc=32 * KiB) as g:
        g.listening.update({6400, 6401})
        s1, slow = host_connect(b, g, 6400)
        s2, fast = host_connect(b, g, 6401)
        try:
            pushed = 0
            with contextlib.suppress(BlockingIOError):
                while pushed < 4 * MiB:  # the guest never reads this one: its credit runs out
                    pushed += s1.send(bytes(64 * KiB))
            transfer(g, [(s2, fast, data(1 * MiB, 11), data(256 * KiB, 12))])
            assert len(slow.data) == 32 * KiB  # exactly its credit, no more
            got = bytearray()
            g.wait(lambda: (got.extend(g.read(slow)), len(got) == pushed)[1], timeout=20)
        finally:
            s1.close()
            s2.close()


def test_host_socket_that_never_sends_its_connect_line_is_closed_after_connect_timeout() -> None:
    with vsock_backend("--connect-timeout", "0.5") as b, guest(b) as g:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(b.uds))
            s.sendall(b"CONN")  # and nothing more
            s.setblocking(False)
            t0 = time.monotonic()
            assert eof(s, g, timeout=5)
            assert 0.4 < time.monotonic() - t0 < 3
            assert b.stats()["connecting_host_sockets"] == 0
        finally:
            s.close()


def test_rsts_owed_to_a_guest_without_rx_buffers_are_bounded() -> None:
    from pyvirtio.devices.vsock import MAX_PENDING_RST

    with vsock_backend() as b, guest(b, rx_buffers=0) as g:
        n = MAX_PENDING_RST + 200
        for i in range(n):  # stray packets, each owed an RST, and no rx buffer to put one in
            g.send_pkt(2000, 10000 + i, VsockOp.RW, b"x")
        g.wait(lambda: b.stats()["bad_packets"] == 0 and b.stats()["rst_dropped"] == 200, timeout=20)
