"""virtio-blk over vhost-user, driven by a small front-end in this process
(codec + driver model + memfd memory): negotiation and config space as QEMU
7.2 asks for them, every request type, bad requests, concurrency, the
write-cache modes, and a back-end killed with requests in flight that
resubmits them after a restart (inflight buffer kept by the front-end)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.blk import (
    BLK_CONFIG,
    DWZ_SEG,
    REQ_HDR,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkDevice,
    BlkFeature,
)
from pyvirtio.driver import BufferPool, PackedDriver, SplitDriver, ring_layout
from pyvirtio.queue import guest_used_idx
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import (
    Config,
    Features,
    InflightInfo,
    ProtocolFeature,
    Request,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    join_packed_vring_base,
)
from pyvirtio.vhost_user.backend import Backend
from pyvirtio.vhost_user.server import Server
from vhost_client import UVA_BASE, Client, Memfd

BIT30 = 1 << 30
MiB = 1 << 20
PROTO_WANTED = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                | ProtocolFeature.INFLIGHT_SHMFD)


def image(tmp_path: Path, size: int = 4 * MiB, fill: bytes | None = None) -> str:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return str(p)


@contextlib.contextmanager
def serving(tmp_path: Path, path: str, policy: str = "lazy", **kw: object) -> Iterator[tuple[str, BlkDevice]]:
    dev = BlkDevice(path, **kw)  # type: ignore[arg-type]
    be = Backend(dev, policy=policy)  # type: ignore[arg-type]
    sock = str(tmp_path / "blk.sock")
    srv = Server(be, socket_path=sock)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield sock, dev
    finally:
        srv.stop()
        t.join(10)
        assert not t.is_alive()
        be.close()


class BlkFrontend:
    """QEMU's vhost-user-blk message order, one request queue, in this process."""

    def __init__(self, path: str, *, packed: bool = False, event_idx: bool = True, indirect: bool = True,
                 queue_size: int = 128, mem_size: int = 16 * MiB, inflight: bool = True,
                 proto_extra: int = 0) -> None:
        self.path = path
        self.packed = packed
        self.event_idx = event_idx
        self.indirect = indirect
        self.queue_size = queue_size
        self.inflight = inflight
        self.proto_extra = proto_extra  # protocol features wanted beyond PROTO_WANTED
        self.mem = Memfd(mem_size)
        self.pool = BufferPool(self.mem.mem, 1 * MiB, mem_size - 1 * MiB)
        desc, drv, dev, _ = ring_layout(packed, queue_size, 0x1000)
        self.addrs = (desc, drv, dev)
        cls = PackedDriver if packed else SplitDriver
        self.driver = cls(self.mem.mem, queue_size, desc, drv, dev, event_idx=event_idx, indirect=indirect,
                          pool=self.pool)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.inflight_fd: int | None = None
        self.inflight_info: InflightInfo | None = None
        self.client: Client | None = None
        self.features = 0

    def connect(self, base: int | None = None) -> None:
        """Connect (or reconnect) and start ring 0; `base` overrides SET_VRING_BASE."""
        c = self.client = Client(self.path)
        offered = c.call(Request.GET_FEATURES).body.value  # type: ignore[union-attr]
        want = int(Feature.VERSION_1) | BIT30 | (offered & int(
            BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.CONFIG_WCE | BlkFeature.MQ
            | BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES | BlkFeature.RO | BlkFeature.TOPOLOGY
            | BlkFeature.SIZE_MAX))
        if self.packed:
            want |= Feature.RING_PACKED
        if self.event_idx:
            want |= Feature.RING_EVENT_IDX
        if self.indirect:
            want |= Feature.RING_INDIRECT_DESC
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
        mine = (PROTO_WANTED if self.inflight else PROTO_WANTED & ~ProtocolFeature.INFLIGHT_SHMFD) | self.proto_extra
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto & mine))
        c.send(Request.SET_OWNER)
        c.send(Request.SET_FEATURES, Features(want))
        self.features = want
        if self.inflight:
            if self.inflight_fd is None:
                r = self._call_with_fds(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, 1, self.queue_size))
                assert isinstance(r, InflightInfo) and r.mmap_size and r.fd is not None
                self.inflight_fd, self.inflight_info = r.fd, r
            info = self.inflight_info
            assert info is not None
            c.send(Request.SET_INFLIGHT_FD, InflightInfo(info.mmap_size, info.mmap_offset, 1, self.queue_size,
                                                          self.inflight_fd))
        c.send(Request.SET_VRING_CALL, VringFd(0, self.call, False))
        assert c.call(Request.SET_MEM_TABLE, self.mem.table(), need_reply=True).body.value == 0  # type: ignore[union-attr]
        desc, drv, dev = self.addrs
        c.send(Request.SET_VRING_NUM, VringState(0, self.queue_size))
        c.send(Request.SET_VRING_BASE, VringState(0, self.driver.vring_base() if base is None else base))
        c.send(Request.SET_VRING_ADDR, VringAddr(0, VringAddrFlags(0), UVA_BASE + desc, UVA_BASE + dev,
                                                 UVA_BASE + drv, 0))
        c.send(Request.SET_VRING_KICK, VringFd(0, self.kick, False))
        assert c.call(Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True).body.value == 0  # type: ignore[union-attr]

    def _call_with_fds(self, request: int, body: object) -> object:
        c = self.client
        assert c is not None
        c.send(request, body)
        while True:
            msg = c.dec.next_message(expect=request)
            if msg is not None:
                return msg.body
            data, anc, _, _ = c.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            fds = [fd for level, kind, raw in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) - len(raw) % 4])]
            if not data:
                raise ConnectionError("back-end closed the connection")
            c.dec.feed(data, fds)

    # -- requests ---------------------------------------------------------------------

    def add(self, typ: int, sector: int = 0, data: bytes = b"", in_len: int = 0, *, token: object = None,
            split_header: int | None = None, status: bool = True, indirect: bool | None = None) -> tuple[int, int]:
        """Stage one request; returns (gpa of the in-data, gpa of the status)."""
        hdr = REQ_HDR.pack(typ, 0, sector)
        out: list[tuple[int, int]] = []
        if split_header is not None:  # the header across two descriptors
            for part in (hdr[:split_header], hdr[split_header:]):
                g = self.pool.alloc(len(part))
                self.mem.mem.write(g, part)
                out.append((g, len(part)))
        else:
            g = self.pool.alloc(16)
            self.mem.mem.write(g, hdr)
            out.append((g, 16))
        if data:
            g = self.pool.alloc(len(data))
            self.mem.mem.write(g, data)
            out.append((g, len(data)))
        ins: list[tuple[int, int]] = []
        dgpa = 0
        if in_len:
            dgpa = self.pool.alloc(in_len)
            ins.append((dgpa, in_len))
        sgpa = self.pool.alloc(1)
        self.mem.mem.write(sgpa, b"\xee")
        if status:
            ins.append((sgpa, 1))
        else:
            out.append((sgpa, 1))  # the status byte readable: the device cannot answer
        self.driver.add(out, ins, token=(token, dgpa, in_len, sgpa), indirect=indirect)
        return dgpa, sgpa

    def submit(self) -> None:
        if self.driver.publish():
            os.eventfd_write(self.kick, 1)

    def reap(self, n: int, timeout: float = 10.0) -> list[tuple[object, int, bytes]]:
        """(token, status, in-data) of `n` completions."""
        out: list[tuple[object, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            used = self.driver.get_used()
            for (tok, dgpa, in_len, sgpa), _ln in used:  # type: ignore[misc]
                st = self.mem.mem.read(sgpa, 1)[0]
                data = self.mem.mem.read(dgpa, in_len) if in_len else b""
                out.append((tok, st, data))
            if not used:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(out)} of {n} requests completed")
                time.sleep(0.002)
        return out

    def do(self, typ: int, sector: int = 0, data: bytes = b"", in_len: int = 0, **kw: object) -> tuple[int, bytes]:
        self.add(typ, sector, data, in_len, **kw)  # type: ignore[arg-type]
        self.submit()
        (_, st, got), = self.reap(1)
        return st, got

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for fd in (self.kick, self.call, self.inflight_fd):
            if fd is not None:
                os.close(fd)
        self.mem.close()


@contextlib.contextmanager
def frontend(sock: str, **kw: object) -> Iterator[BlkFrontend]:
    fe = BlkFrontend(sock, **kw)  # type: ignore[arg-type]
    try:
        fe.connect()
        yield fe
    finally:
        fe.close()


# --- conventions and negotiation --------------------------------------------------------------


def test_print_capabilities_is_exactly_the_qemu_backend_convention() -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirtio", "blk", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    assert out == '{"type": "block", "features": ["read-only", "blk-file"]}\n'


def test_features_queue_count_and_config_space_as_qemu_asks(tmp_path: Path) -> None:
    with serving(tmp_path, image(tmp_path, 8 * MiB), num_queues=4, seg_max=254) as (sock, _dev):
        c = Client(sock)
        feats = c.call(Request.GET_FEATURES).body.value  # type: ignore[union-attr]
        for bit in (Feature.VERSION_1, Feature.RING_EVENT_IDX, Feature.RING_PACKED, Feature.RING_INDIRECT_DESC,
                    BlkFeature.SEG_MAX, BlkFeature.SIZE_MAX, BlkFeature.BLK_SIZE, BlkFeature.TOPOLOGY,
                    BlkFeature.FLUSH, BlkFeature.CONFIG_WCE, BlkFeature.MQ, BlkFeature.DISCARD,
                    BlkFeature.WRITE_ZEROES):
            assert feats & bit, bit
        assert not feats & BlkFeature.RO
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
        for bit in (ProtocolFeature.MQ, ProtocolFeature.CONFIG, ProtocolFeature.INFLIGHT_SHMFD,
                    ProtocolFeature.REPLY_ACK):
            assert proto & bit, bit
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto))
        assert c.call(Request.GET_QUEUE_NUM).body.value == 4  # type: ignore[union-attr]
        # QEMU 7.2 asks the feature-dependent length (57 with discard + write-zeroes); the
        # reply must be exactly that long
        for size in (57, 60, 72):
            cfg = c.call(Request.GET_CONFIG, Config(0, size, 0, bytes(size))).body
            assert isinstance(cfg, Config) and cfg.size == size and len(cfg.payload) == size
        full = c.call(Request.GET_CONFIG, Config(0, 72, 0, bytes(72))).body.payload  # type: ignore[union-attr]
        (capacity, size_max, seg_max, _cyl, _heads, _secs, blk_size, exp, _align, min_io, _opt, wce, _u,
         num_queues, max_discard, max_discard_seg, discard_align, max_wz, max_wz_seg, wz_unmap,
         *_rest) = BLK_CONFIG.unpack(full)
        assert (capacity, seg_max, blk_size, wce, num_queues) == (8 * MiB // 512, 254, 512, 1, 4)
        assert size_max >= 4096 and exp == 3 and min_io == 8
        assert max_discard and max_discard_seg and discard_align and max_wz and max_wz_seg and wz_unmap == 1
        # the driver turns the write cache off (QEMU: SET_CONFIG offset 32, 1 byte); read-only fields refused
        ack = c.call(Request.SET_CONFIG, Config(32, 1, 0, b"\x00"), need_reply=True).body
        assert ack.value == 0  # type: ignore[union-attr]
        assert c.call(Request.GET_CONFIG, Config(32, 1, 0, b"\0")).body.payload == b"\x00"  # type: ignore[union-attr]
        ack = c.call(Request.SET_CONFIG, Config(0, 8, 0, bytes(8)), need_reply=True).body
        assert ack.value != 0  # type: ignore[union-attr]
        c.close()


def test_a_read_only_disk_offers_ro_and_refuses_writes(tmp_path: Path) -> None:
    path = image(tmp_path, fill=b"\x5a")
    with serving(tmp_path, path, read_only=True) as (sock, _dev), frontend(sock) as fe:
        assert fe.features & BlkFeature.RO
        assert fe.do(T_OUT, 0, b"x" * 512)[0] == S_IOERR
        assert fe.do(T_IN, 0, in_len=512) == (S_OK, b"\x5a" * 512)
    assert Path(path).read_bytes()[:512] == b"\x5a" * 512


# --- data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("policy", ["lazy", "eager"])
def test_written_data_reads_back_and_lands_in_the_image(tmp_path: Path, ring: str, indirect: bool,
                                                         policy: str) -> None:
    path = image(tmp_path)
    data = os.urandom(64 * 1024)
    with (serving(tmp_path, path, policy=policy) as (sock, _dev),
          frontend(sock, packed=ring == "packed", indirect=indirect) as fe):
        assert fe.do(T_OUT, 8, data) == (S_OK, b"")
        assert fe.do(T_IN, 8, in_len=len(data)) == (S_OK, data)
        assert fe.do(T_IN, 0, in_len=4096) == (S_OK, bytes(4096))
        # the last sector of the disk is reachable
        last = 4 * MiB // 512 - 1
        assert fe.do(T_OUT, last, b"\x01" * 512)[0] == S_OK
        assert fe.do(T_IN, last, in_len=512) == (S_OK, b"\x01" * 512)
    with open(path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(len(data)) == data


@pytest.mark.parametrize("where", ["pool", "page-cache"])
def test_many_requests_in_flight_complete_with_their_own_data(tmp_path: Path, where: str) -> None:
    """A burst of reads: either through the I/O pool (each request held long
    enough to overlap others) or straight from the host page cache on the
    queue's thread (RWF_NOWAIT); every one gets its own sector's data."""
    pattern = b"".join(struct.pack("<Q", i) * 64 for i in range(8192))  # sector i holds i
    path = image(tmp_path, 4 * MiB, fill=pattern)
    kw = {"inject_latency": 0.002} if where == "pool" else {}
    with serving(tmp_path, path, io_threads=4, **kw) as (sock, dev), frontend(sock, queue_size=256) as fe:
        sectors = [(i * 37) % 8192 for i in range(120)]
        for i, s in enumerate(sectors):
            fe.add(T_IN, s, in_len=512, token=i)
        fe.submit()
        got = fe.reap(len(sectors))
    assert sorted(t for t, _, _ in got) == list(range(len(sectors)))  # type: ignore[type-var]
    for tok, st, data in got:
        assert st == S_OK and data == struct.pack("<Q", sectors[tok]) * 64  # type: ignore[index]
    assert dev.counts.reads == len(sectors)
    if where == "pool":
        assert dev.counts.pooled > 0
    else:  # the image was just written: every read is a page-cache hit
        assert dev.counts.pooled == 0 and dev.counts.inline == len(sectors)


def test_buffered_writes_run_on_the_queue_thread_until_one_stalls(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes into the host page cache are done on the queue's thread (the
    pool's hand-off costs more CPU than the copy); a write that stalls (the
    host throttling dirty pages) sends the writes after it to the pool, where
    they overlap again."""
    path = image(tmp_path, 4 * MiB)
    with serving(tmp_path, path, io_threads=4) as (sock, dev), frontend(sock) as fe:
        def burst(first: int) -> None:
            for i in range(16):
                fe.add(T_OUT, 8 * (first + i), data=bytes([first + i]) * 4096, token=i)
            fe.submit()
            assert sorted(st for _, st, _ in fe.reap(16)) == [S_OK] * 16

        monkeypatch.setattr(dev, "SLOW_WRITE", 5.0)  # no write counts as stalled, however loaded the machine
        burst(0)
        assert (dev.counts.inline, dev.counts.pooled) == (16, 0)
        monkeypatch.setattr(dev, "SLOW_WRITE", 0.01)
        real = dev._write
        stall = [0.05]

        def stalled(req: object) -> None:
            if stall:
                time.sleep(stall.pop())
            real(req)  # type: ignore[arg-type]

        monkeypatch.setattr(dev, "_write", stalled)
        burst(16)
        assert dev.counts.pooled > 0
    with open(path, "rb") as f:
        for i in range(32):
            f.seek(8 * 512 * i)
            assert f.read(4096) == bytes([i]) * 4096


def test_flush_syncs_the_file_before_the_status_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        seen.append(fd)

    with serving(tmp_path, image(tmp_path)) as (sock, dev), frontend(sock) as fe:
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        assert fe.do(T_OUT, 0, b"a" * 512)[0] == S_OK
        assert not seen  # writeback cache: a write alone is not synced
        assert fe.do(T_FLUSH)[0] == S_OK
        assert seen == [dev.fd]


def test_writethrough_mode_makes_every_write_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags: list[tuple[int, ...]] = []
    real = os.pwritev

    def pwritev(fd: int, bufs: list[memoryview], off: int, *fl: int) -> int:
        flags.append(fl)
        return real(fd, bufs, off, *fl)

    with serving(tmp_path, image(tmp_path)) as (sock, _dev), frontend(sock) as fe:
        assert fe.client is not None
        monkeypatch.setattr(os, "pwritev", pwritev)
        assert fe.do(T_OUT, 0, b"a" * 512)[0] == S_OK
        fe.client.call(Request.SET_CONFIG, Config(32, 1, 0, b"\x00"), need_reply=True)
        assert fe.do(T_OUT, 0, b"b" * 512)[0] == S_OK
    assert flags == [(), (os.RWF_DSYNC,)]


def test_get_id_returns_the_serial(tmp_path: Path) -> None:
    with (serving(tmp_path, image(tmp_path), serial="pyvirtio-serial-0123456789") as (sock, _dev),
          frontend(sock) as fe):
        assert fe.do(T_GET_ID, in_len=20) == (S_OK, b"pyvirtio-serial-0123")
        assert fe.do(T_GET_ID, in_len=32) == (S_OK, b"pyvirtio-serial-0123" + bytes(12))  # 20 bytes at most


def test_a_short_serial_is_nul_padded_over_what_the_buffer_held(tmp_path: Path) -> None:
    with serving(tmp_path, image(tmp_path), serial="disk7") as (sock, _dev), frontend(sock) as fe:
        dgpa, _ = fe.add(T_GET_ID, in_len=20)
        fe.mem.mem.write(dgpa, b"\xff" * 20)  # stale guest data in the answer buffer
        fe.submit()
        ((_, st, got),) = fe.reap(1)
        assert (st, got) == (S_OK, b"disk7" + bytes(15))


def test_discard_and_write_zeroes_deallocate_and_read_back_as_zeros(tmp_path: Path) -> None:
    path = image(tmp_path, fill=b"\xff")
    blocks_before = os.stat(path).st_blocks
    with serving(tmp_path, path) as (sock, _dev), frontend(sock) as fe:
        segs = DWZ_SEG.pack(0, 256, 0) + DWZ_SEG.pack(1024, 256, 0)
        assert fe.do(T_DISCARD, 0, segs)[0] == S_OK
        assert fe.do(T_IN, 0, in_len=256 * 512)[1] == bytes(256 * 512)
        assert fe.do(T_WRITE_ZEROES, 0, DWZ_SEG.pack(2048, 128, 1))[0] == S_OK   # with UNMAP
        assert fe.do(T_WRITE_ZEROES, 0, DWZ_SEG.pack(4096, 128, 0))[0] == S_OK   # without
        for s in (2048, 4096):
            assert fe.do(T_IN, s, in_len=128 * 512)[1] == bytes(128 * 512)
        assert fe.do(T_IN, 4096 + 128, in_len=512)[1] == b"\xff" * 512  # neighbours untouched
        # reserved flags: UNSUPP; a range past the end: IOERR
        assert fe.do(T_DISCARD, 0, DWZ_SEG.pack(0, 8, 1))[0] == S_UNSUPP
        assert fe.do(T_WRITE_ZEROES, 0, DWZ_SEG.pack(0, 8, 2))[0] == S_UNSUPP
        assert fe.do(T_DISCARD, 0, DWZ_SEG.pack(8190, 8, 0))[0] == S_IOERR
        assert fe.do(T_DISCARD, 0, b"\0" * 15)[0] == S_IOERR
    assert os.stat(path).st_blocks < blocks_before  # holes were punched


# --- bad requests ---------------------------------------------------------------------------------


LAST = 4 * MiB // 512


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_bad_requests_get_a_status_and_the_queue_keeps_working(tmp_path: Path, ring: str) -> None:
    with serving(tmp_path, image(tmp_path)) as (sock, dev), frontend(sock, packed=ring == "packed") as fe:
        cases = [
            ((T_IN, LAST, b"", 512), S_IOERR),             # past the end
            ((T_IN, LAST - 1, b"", 1024), S_IOERR),        # straddling the end
            ((T_OUT, 2**64 - 1, b"x" * 512, 0), S_IOERR),  # sector overflow
            ((T_IN, 2**63, b"", 512), S_IOERR),
            ((T_IN, 0, b"", 100), S_IOERR),                # not whole sectors
            ((T_OUT, 0, b"x" * 100, 0), S_IOERR),
            ((99, 0, b"", 0), S_UNSUPP),                   # unknown type
            ((10, 0, b"", 16), S_UNSUPP),                  # GET_LIFETIME: not offered
        ]
        for (typ, sector, data, in_len), want in cases:
            assert fe.do(typ, sector, data, in_len)[0] == want, (typ, sector, len(data), in_len)
        # a header shorter than 16 bytes: IOERR
        g = fe.pool.alloc(8)
        s = fe.pool.alloc(1)
        fe.driver.add([(g, 8)], [(s, 1)], token=("short", 0, 0, s))
        fe.submit()
        assert fe.reap(1)[0][1] == S_IOERR
        # a header split across descriptors is legal framing (ANY_LAYOUT): served
        assert fe.do(T_OUT, 3, b"y" * 512, split_header=7, indirect=False)[0] == S_OK
        assert fe.do(T_IN, 3, in_len=512, split_header=12, indirect=False) == (S_OK, b"y" * 512)
        # no writable status byte: returned with length 0, the ring goes on
        fe.add(T_IN, 0, status=False)
        fe.submit()
        assert fe.reap(1)[0][1] == 0xEE  # untouched
        assert dev.counts.no_status == 1
        assert fe.do(T_IN, 3, in_len=512) == (S_OK, b"y" * 512)


# --- reconnect with requests in flight ------------------------------------------------------------


def _spawn(sock: str, path: str, *extra: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "pyvirtio", "blk", "--socket-path", sock, "--blk-file", path,
                          "--queues", "1", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            return p
        if p.poll() is not None:
            raise RuntimeError(f"backend exited: {p.stderr.read().decode() if p.stderr else ''}")
        time.sleep(0.05)
    p.kill()
    raise TimeoutError("backend did not listen")


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_a_killed_backend_resubmits_what_was_in_flight_after_a_restart(tmp_path: Path, ring: str) -> None:
    path = image(tmp_path)
    sock = str(tmp_path / "blk.sock")
    procs: list[subprocess.Popen[bytes]] = []
    fe = BlkFrontend(sock, packed=ring == "packed", queue_size=64)
    try:
        procs.append(_spawn(sock, path, "--inject-latency-ms", "400", "--io-threads", "2"))
        fe.connect()
        payloads = [bytes([i + 1]) * 4096 for i in range(6)]
        for i, p in enumerate(payloads):
            fe.add(T_OUT, i * 8, p, token=i)
        fe.submit()
        time.sleep(0.3)   # taken, in flight (the first two in the I/O threads)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        done_before = [tok for (tok, *_), _ in fe.driver.get_used()]  # type: ignore[misc]
        assert fe.client is not None
        fe.client.close()
        # the front-end keeps the inflight buffer and the rings; a new back-end comes up
        procs.append(_spawn(sock, path, "--io-threads", "2"))
        if fe.packed:
            base = join_packed_vring_base(0, True, 0, True)  # QEMU's stale packed state after a crash
        else:
            base = guest_used_idx(fe.mem.mem, fe.addrs[2])   # QEMU: the guest's used->idx
        fe.connect(base=base)
        after = fe.reap(len(payloads) - len(done_before))
        assert all(st == S_OK for _, st, _ in after)
        tokens = sorted(done_before + [t for t, _, _ in after])  # type: ignore[type-var]
        assert tokens == list(range(len(payloads)))                # each exactly once
        # new work after the resubmitted requests
        assert fe.do(T_IN, 0, in_len=6 * 4096) == (S_OK, b"".join(payloads))
        err = b""
    finally:
        fe.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if procs and procs[-1].stderr is not None:
            err = procs[-1].stderr.read()
            for p in procs:
                if p.stderr is not None:
                    p.stderr.close()
    assert b"resubmitting" in err
    with open(path, "rb") as f:
        assert f.read(6 * 4096) == b"".join(payloads)
    assert not os.path.exists(sock)


# --- the public device API ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _load_ramdisk() -> type:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ramdisk_blk", REPO / "examples" / "ramdisk_blk.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.RamDisk  # type: ignore[no-any-return]


def test_the_ramdisk_example_serves_requests_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    sock = str(tmp_path / "ram.sock")
    p = subprocess.Popen([sys.executable, str(REPO / "examples" / "ramdisk_blk.py"), "--socket-path", sock,
                          "--size-mib", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.02)
        with frontend(sock, packed=True, inflight=False) as fe:
            c = fe.client
            assert c is not None
            cfg = c.call(Request.GET_CONFIG, Config(0, 57, 0, bytes(57))).body
            assert isinstance(cfg, Config) and len(cfg.payload) == 57
            assert struct.unpack_from("<Q", cfg.payload)[0] == 4 * MiB // 512
            data = os.urandom(8192)
            assert fe.do(T_OUT, 16, data) == (S_OK, b"")
            assert fe.do(T_IN, 16, in_len=8192) == (S_OK, data)
            st, ident = fe.do(T_GET_ID, in_len=20)
            assert st == S_OK and ident.startswith(b"pyvirtio-ramdisk")
            assert fe.do(T_IN, 4 * MiB // 512, in_len=512)[0] == S_IOERR
            assert fe.do(T_DISCARD, 0, DWZ_SEG.pack(0, 8, 0))[0] == S_UNSUPP
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert not os.path.exists(sock)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()


def test_serve_async_runs_a_device_until_cancelled_and_survives_a_handler_bug(tmp_path: Path) -> None:
    import asyncio

    import pyvirtio

    ramdisk = _load_ramdisk()

    class Buggy(ramdisk):  # type: ignore[misc, valid-type]
        def handle(self, queue: int, chain: pyvirtio.Chain) -> int:
            if chain.readable_len >= 16 and struct.unpack_from("<Q", chain.read(16), 8)[0] == 13:
                raise RuntimeError("a device bug")
            return super().handle(queue, chain)  # type: ignore[no-any-return]

    sock = str(tmp_path / "async.sock")
    state: dict[str, object] = {}
    ready = threading.Event()

    def runner() -> None:
        async def main() -> None:
            state["task"] = asyncio.current_task()
            state["loop"] = asyncio.get_running_loop()
            ready.set()
            await pyvirtio.serve_async(Buggy(1 * MiB), socket_path=sock)

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            state["cancelled"] = True

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    assert ready.wait(10)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with frontend(sock, inflight=False) as fe:
        assert fe.do(T_OUT, 1, b"z" * 512)[0] == S_OK
        assert fe.do(T_IN, 13, in_len=512)[0] == 0xEE      # the handler raised: completed, nothing written
        assert fe.do(T_IN, 1, in_len=512) == (S_OK, b"z" * 512)  # and the queue goes on
    loop = state["loop"]
    task = state["task"]
    loop.call_soon_threadsafe(task.cancel)  # type: ignore[attr-defined]
    t.join(10)
    assert not t.is_alive() and state.get("cancelled")
    assert not os.path.exists(sock)
