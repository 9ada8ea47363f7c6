"""Hostile vhost-user front-ends over a real unix socket (issue 7, "Hostile frontend").

Every case connects to an in-process `Server` (a thread), sends something the
protocol forbids and must then see:

- its connection closed by the back-end, with the reason in the server's log
  (matched against the case's pattern, so a case that is dropped for some
  *other* reason fails);
- the server still listening, and a well-behaved front-end connecting next
  negotiating and passing frames through `loopback` (split ring, event idx);
- no leak: the process's open fds and its memfd mappings
  (`/proc/self/fd`, the `memfd:` lines of `/proc/self/maps`) back to what
  they were before the bad front-end connected, *while the server still
  runs* (so the back-end really released that connection's fds and guest
  memory, not merely at exit), and again after the good front-end left.

tests/test_vhost_user_backend.py already covers nine bad front-ends (a 7-byte
header, an 8-byte SET_FEATURES of 4, two fds for one region, SET_VRING_NUM
of ring 7, a descriptor table outside memory, a region twice its file,
an unoffered feature, garbage, 12 fds on SET_OWNER); the cases here are the
rest of the issue's list and the variants a reviewer would try next.
Accepted-but-odd behaviour (messages the protocol allows before
negotiation, unimplemented requests carrying fds, a split SET_VRING_BASE
far from used->idx, a flood of legal messages) has its own tests below.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtio.devices.net import NetDevice
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import (
    Features,
    InflightInfo,
    MemoryRegion,
    MemRegMsg,
    ProtocolFeature,
    Request,
    SetMemTable,
    Status,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    encode_frame,
    encode_request,
)
from pyvirtio.vhost_user.backend import MAX_MEM_SLOTS, Backend
from pyvirtio.vhost_user.server import Server
from vhost_client import HDR, UVA_BASE, Client, Memfd, NetFrontend, fd_count

BIT30 = 1 << 30
V1 = 0x1  # header flags: version 1
NUM_QUEUES = 2  # one queue pair, no control queue
QSIZE = 64
PROTO = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.STATUS
            | ProtocolFeature.CONFIGURE_MEM_SLOTS)


# --- resources and the server --------------------------------------------------------


def memfd_maps() -> int:
    """Mappings of memfds in this process (guest memory, ours or the back-end's)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)


def resources(collect: bool = True) -> tuple[int, int]:
    if collect:
        gc.collect()  # ring windows and chains of stopped queues hold views into maps
    return fd_count(), memfd_maps()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def settled(base: tuple[int, int], timeout: float = 0.5) -> tuple[int, int]:
    """Wait until resources are back to `base` (the back-end releases a
    connection just after the client sees EOF); return the last reading."""
    last = resources(collect=False)
    deadline = time.monotonic() + timeout
    while last != base and time.monotonic() < deadline:
        time.sleep(0.01)
        last = resources()
    return last


@dataclass
class Served:
    path: str
    backend: Backend
    server: Server
    thread: threading.Thread


@contextlib.contextmanager
def serving(tmp_path, backend: str = "loopback") -> Iterator[Served]:
    be = Backend(NetDevice(backend))
    path = str(tmp_path / "hostile.sock")
    srv = Server(be, socket_path=path)
    t = threading.Thread(target=srv.serve_forever, name="vhost-server", daemon=True)
    t.start()
    try:
        yield Served(path, be, srv, t)
    finally:
        srv.stop()
        t.join(10)
        assert not t.is_alive(), "the server did not stop"
        be.close()


def frames(n: int, size: int = 60) -> list[bytes]:
    return [bytes([i & 0xFF]) * 6 + b"\xaa" * 6 + b"\x88\xb5" + os.urandom(size - 14) for i in range(n)]


def good_frontend_works(path: str, n: int = 8) -> None:
    """A well-behaved front-end: negotiate, two rings, n frames through loopback."""
    fe = NetFrontend(path)
    try:
        fe.negotiate()
        fe.setup_ring(0)
        fe.setup_ring(1)
        fe.post_rx(0, n + 2)
        sent = frames(n)
        fe.send_frames(1, sent)
        assert len(fe.reap(1, n)) == n, "tx buffers were not returned"
        got = fe.reap(0, n)
        assert len(got) == n, "frames did not come back"
        for (gpa, length), f in zip(got, sent):
            assert fe.mem.mem.read(gpa, length)[HDR:] == f  # type: ignore[arg-type]
    finally:
        fe.close()


# --- building bad messages ----------------------------------------------------------------


def send_fds(c: Client, data: bytes, nfds: int) -> None:
    """Send `data` with `nfds` fresh eventfds attached (our copies closed)."""
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        c.send_raw(data, fds)
    finally:
        for fd in fds:
            os.close(fd)


def vring_fd_word(index: int, nofd: bool = False) -> bytes:
    return struct.pack("<Q", index | (0x100 if nofd else 0))


def negotiated(fe: NetFrontend, packed: bool = False, proto: int = PROTO, mem: bool = True) -> None:
    """Features and protocol features agreed (and the memory table sent)."""
    c = fe.client
    c.call(Request.GET_FEATURES)
    c.call(Request.GET_PROTOCOL_FEATURES)
    c.send(Request.SET_PROTOCOL_FEATURES, Features(proto))
    c.send(Request.SET_OWNER)
    want = int(Feature.VERSION_1 | Feature.RING_EVENT_IDX) | BIT30 | (int(Feature.RING_PACKED) if packed else 0)
    c.send(Request.SET_FEATURES, Features(want))
    fe.features = want
    fe.packed = packed
    if mem:
        assert c.call(Request.SET_MEM_TABLE, fe.mem.table(), need_reply=True).body.value == 0  # type: ignore[union-attr]


def ring_msgs(fe: NetFrontend, index: int = 1, num: int = QSIZE, desc: int = 0x1000, avail: int = 0x2000,
              used: int = 0x3000, base: int = 0, kick: bool = True) -> None:
    """NUM, BASE, ADDR (+KICK): a ring started at the given guest-physical offsets."""
    c = fe.client
    c.send(Request.SET_VRING_NUM, VringState(index, num))
    c.send(Request.SET_VRING_BASE, VringState(index, base))
    c.send(Request.SET_VRING_ADDR, VringAddr(index, VringAddrFlags(0), UVA_BASE + desc, UVA_BASE + used,
                                             UVA_BASE + avail, 0))
    if kick:
        kfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            c.send(Request.SET_VRING_KICK, VringFd(index, kfd, False))
        finally:
            os.close(kfd)


def mem_table_payload(regions: list[tuple[int, int, int, int]], nregions: int | None = None) -> bytes:
    n = len(regions) if nregions is None else nregions
    return struct.pack("<II", n, 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)


class KeptConnected(AssertionError):
    """The back-end did not drop the hostile front-end."""


class Leak(AssertionError):
    """Fds or guest-memory mappings outlived the connection."""


# --- the cases ------------------------------------------------------------------------------

Case = Callable[[NetFrontend], None]
CASES: list[tuple[str, str, Case]] = []


def case(reason: str) -> Callable[[Case], Case]:
    """Register a hostile front-end; `reason` is a regex the server's log must match."""
    def register(fn: Case) -> Case:
        CASES.append((fn.__name__, reason, fn))
        return fn
    return register


PROTOCOL_ERROR = r"frontend protocol error, closing the connection: "
HUNG_UP = r"frontend hung up in the middle of a message"


# truncated headers and payloads: the front-end hangs up mid-message


@case(HUNG_UP + r" \(1 bytes pending\)")
def truncated_header_1_byte(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_FEATURES, V1)[:1])
    fe.client.sock.shutdown(socket.SHUT_WR)


@case(HUNG_UP + r" \(11 bytes pending\)")
def truncated_header_11_bytes(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_FEATURES, V1)[:11])
    fe.client.sock.shutdown(socket.SHUT_WR)


@case(HUNG_UP + r" \(32 bytes pending\)")
def truncated_payload(fe: NetFrontend) -> None:
    data, _ = encode_request(Request.SET_VRING_ADDR, VringAddr(0, VringAddrFlags(0), 0, 0, 0, 0))
    fe.client.send_raw(data[:32])  # header + 20 of 40 payload bytes
    fe.client.sock.shutdown(socket.SHUT_WR)


@case(HUNG_UP + r" \(6 bytes pending\)")
def truncated_header_carrying_fds(fe: NetFrontend) -> None:
    send_fds(fe.client, encode_frame(Request.SET_VRING_CALL, V1, vring_fd_word(0))[:6], 2)
    fe.client.sock.shutdown(socket.SHUT_WR)


@case(HUNG_UP)
def truncated_memory_table_carrying_its_memfd(fe: NetFrontend) -> None:
    data, fds = encode_request(Request.SET_MEM_TABLE, fe.mem.table())
    fe.client.send_raw(data[:30], fds)
    fe.client.sock.shutdown(socket.SHUT_WR)


# sizes above the protocol maximum: refused from the header alone, without waiting for the payload


@case(r"payload size 4097 exceeds 4096")
def size_one_above_maximum_header_only(fe: NetFrontend) -> None:
    fe.client.send_raw(struct.pack("<III", Request.SET_MEM_TABLE, V1, 4097))


@case(r"payload size 4294967295 exceeds 4096")
def size_u32_max(fe: NetFrontend) -> None:
    fe.client.send_raw(struct.pack("<III", Request.GET_FEATURES, V1, 0xFFFF_FFFF) + b"\0" * 64)


@case(r"request 99: payload size 5000 exceeds 4096")
def oversized_unknown_request(fe: NetFrontend) -> None:
    fe.client.send_raw(struct.pack("<III", 99, V1, 5000) + b"\0" * 100)


@case(r"GET_CONFIG: config size 257 exceeds 256")
def config_size_above_maximum(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_CONFIG, V1, struct.pack("<III", 0, 257, 0) + bytes(257)))


@case(r"SET_MEM_TABLE: 9 memory regions, at most 8 allowed")
def nine_memory_regions(fe: NetFrontend) -> None:
    regions = [(i << 20, 1 << 20, UVA_BASE + (i << 20), 0) for i in range(9)]
    send_fds(fe.client, encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload(regions)), 8)


# payload sizes that disagree with the message


@case(r"SET_VRING_NUM: payload is 4 bytes, the request requires 8")
def vring_num_of_4_bytes(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.SET_VRING_NUM, V1, struct.pack("<I", 0)))


@case(r"SET_VRING_ADDR: payload is 32 bytes, the request requires 40")
def vring_addr_without_log_field(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.SET_VRING_ADDR, V1, bytes(32)))


@case(r"SET_VRING_ADDR: payload is 48 bytes, the request requires 40")
def vring_addr_with_old_size_field(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.SET_VRING_ADDR, V1, bytes(48)))


@case(r"GET_FEATURES: payload is 8 bytes, the request requires 0")
def get_features_with_a_payload(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_FEATURES, V1, bytes(8)))


@case(r"SET_VRING_KICK: payload is 4 bytes, the request requires 8")
def vring_kick_of_4_bytes(fe: NetFrontend) -> None:
    send_fds(fe.client, encode_frame(Request.SET_VRING_KICK, V1, bytes(4)), 1)


@case(r"SET_MEM_TABLE: payload is 72 bytes, the request requires 40")
def memory_table_with_more_regions_than_advertised(fe: NetFrontend) -> None:
    r = (0, fe.mem.size, UVA_BASE, 0)
    r2 = (1 << 30, 1 << 20, UVA_BASE + (1 << 30), 0)
    fe.client.send_raw(encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload([r, r2], nregions=1)),
                       [fe.mem.fd])


@case(r"SET_MEM_TABLE: payload is 40 bytes, the request requires 72")
def memory_table_with_fewer_regions_than_advertised(fe: NetFrontend) -> None:
    r = (0, fe.mem.size, UVA_BASE, 0)
    fe.client.send_raw(encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload([r], nregions=2)),
                       [fe.mem.fd, fe.mem.fd])


@case(r"GET_CONFIG: payload is 16 bytes, the request requires 24")
def config_size_field_disagrees_with_payload(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_CONFIG, V1, struct.pack("<III", 0, 12, 0) + bytes(4)))


@case(r"GET_INFLIGHT_FD: payload is 16 bytes, the request requires 24")
def inflight_request_of_16_bytes(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_INFLIGHT_FD, V1, bytes(16)))


@case(r"SET_STATUS: payload is 1 bytes, the request requires 8")
def status_of_one_byte(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.SET_STATUS, V1, b"\x0f"))


# too many / too few fds


@case(r"SET_VRING_KICK: carries 0 fds, the request requires 1")
def kick_without_its_fd(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.SET_VRING_KICK, V1, vring_fd_word(0)))


@case(r"SET_VRING_CALL: carries 2 fds, the request requires 1")
def call_with_two_fds(fe: NetFrontend) -> None:
    send_fds(fe.client, encode_frame(Request.SET_VRING_CALL, V1, vring_fd_word(0)), 2)


@case(r"SET_VRING_CALL: carries 1 fds, the request requires 0")
def call_nofd_with_an_fd(fe: NetFrontend) -> None:
    send_fds(fe.client, encode_frame(Request.SET_VRING_CALL, V1, vring_fd_word(0, nofd=True)), 1)


@case(r"SET_MEM_TABLE: carries 1 fds, the request requires 2")
def memory_table_of_two_regions_with_one_fd(fe: NetFrontend) -> None:
    regions = [(0, 1 << 20, UVA_BASE, 0), (1 << 20, 1 << 20, UVA_BASE + (1 << 20), 1 << 20)]
    fe.client.send_raw(encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload(regions)), [fe.mem.fd])


@case(r"GET_FEATURES: carries 1 fds, the request requires 0")
def get_features_with_an_fd(fe: NetFrontend) -> None:
    send_fds(fe.client, encode_frame(Request.GET_FEATURES, V1), 1)


@case(r"ADD_MEM_REG: carries 0 fds, the request requires 1")
def add_mem_reg_without_its_fd(fe: NetFrontend) -> None:
    negotiated(fe, mem=False)
    fe.client.send_raw(encode_frame(Request.ADD_MEM_REG, V1, bytes(8) + struct.pack(
        "<QQQQ", 0, fe.mem.size, UVA_BASE, 0)))


@case(r"more than 8 file descriptors")
def nine_fds(fe: NetFrontend) -> None:
    send_fds(fe.client, encode_frame(Request.SET_OWNER, V1), 9)


@case(r"more than 8 file descriptors")
def fds_trickled_with_a_slow_payload(fe: NetFrontend) -> None:
    """Eight fds on each byte of a payload that never completes: the back-end
    must not collect fds beyond what any message may carry (without a bound,
    4096 bytes x 8 fds exhaust the process's fd table)."""
    c = fe.client
    c.send_raw(struct.pack("<III", 99, V1, 4000))
    for _ in range(64):
        send_fds(c, b"\0", 8)  # raises EPIPE once the back-end has dropped us
        time.sleep(0.01)  # one recvmsg per chunk


# overlapping regions


@case(r"memory regions at gpa 0x0 and 0x100000 overlap")
def memory_table_regions_overlap_in_guest_physical_space(fe: NetFrontend) -> None:
    regions = [(0, 2 << 20, UVA_BASE, 0), (1 << 20, 1 << 20, UVA_BASE + (4 << 20), 0)]
    fe.client.send_raw(encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload(regions)),
                       [fe.mem.fd, fe.mem.fd])


@case(r"frontend addresses overlap")
def memory_table_regions_overlap_in_frontend_address_space(fe: NetFrontend) -> None:
    regions = [(0, 1 << 20, UVA_BASE, 0), (1 << 30, 1 << 20, UVA_BASE + (1 << 19), 1 << 20)]
    fe.client.send_raw(encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload(regions)),
                       [fe.mem.fd, fe.mem.fd])


@case(r"memory regions at gpa 0x0 and 0x0 overlap")
def memory_table_with_the_same_region_twice(fe: NetFrontend) -> None:
    r = (0, 1 << 20, UVA_BASE, 0)
    fe.client.send_raw(encode_frame(Request.SET_MEM_TABLE, V1, mem_table_payload([r, r])), [fe.mem.fd, fe.mem.fd])


@case(r"ADD_MEM_REG: region .* overlaps")
def added_region_overlaps_the_table(fe: NetFrontend) -> None:
    negotiated(fe)
    r = MemoryRegion(1 << 20, 1 << 20, UVA_BASE + (64 << 20), 0)
    fe.client.send(Request.ADD_MEM_REG, MemRegMsg(r, fe.mem.fd), need_reply=True)


# regions beyond the end of their file (mapping them would SIGBUS on first touch)


@case(r"reaches past the end of its file")
def region_starting_at_the_end_of_its_file(fe: NetFrontend) -> None:
    table = SetMemTable((MemoryRegion(0, 1 << 20, UVA_BASE, fe.mem.size),), (fe.mem.fd,))
    fe.client.send(Request.SET_MEM_TABLE, table, need_reply=True)


@case(r"reaches past the end of its file")
def region_offset_pushes_it_past_the_end(fe: NetFrontend) -> None:
    table = SetMemTable((MemoryRegion(0, fe.mem.size, UVA_BASE, 4096),), (fe.mem.fd,))
    fe.client.send(Request.SET_MEM_TABLE, table, need_reply=True)


@case(r"wraps 64 bits|reaches past the end of its file")
def region_offset_near_2_to_the_64(fe: NetFrontend) -> None:
    table = SetMemTable((MemoryRegion(0, 1 << 20, UVA_BASE, (1 << 64) - 4096),), (fe.mem.fd,))
    fe.client.send(Request.SET_MEM_TABLE, table, need_reply=True)


@case(r"guest_phys_addr 0xfffffffffffff000 \+ size 0x2000 wraps 64 bits")
def region_wrapping_the_guest_address_space(fe: NetFrontend) -> None:
    table = SetMemTable((MemoryRegion((1 << 64) - 4096, 8192, UVA_BASE, 0),), (fe.mem.fd,))
    fe.client.send(Request.SET_MEM_TABLE, table, need_reply=True)


@case(r"has size 0")
def region_of_size_zero(fe: NetFrontend) -> None:
    table = SetMemTable((MemoryRegion(0, 0, UVA_BASE, 0),), (fe.mem.fd,))
    fe.client.send(Request.SET_MEM_TABLE, table, need_reply=True)


@case(r"reaches past the end of its file")
def added_region_past_the_end_of_its_file(fe: NetFrontend) -> None:
    negotiated(fe, mem=False)
    r = MemoryRegion(0, fe.mem.size + 4096, UVA_BASE, 0)
    fe.client.send(Request.ADD_MEM_REG, MemRegMsg(r, fe.mem.fd), need_reply=True)


# more regions than advertised (GET_MAX_MEM_SLOTS)


@case(rf"ADD_MEM_REG beyond the {MAX_MEM_SLOTS} slots offered")
def more_regions_added_than_slots_offered(fe: NetFrontend) -> None:
    negotiated(fe, mem=False)
    c = fe.client
    slots = c.call(Request.GET_MAX_MEM_SLOTS).body.value  # type: ignore[union-attr]
    assert slots == MAX_MEM_SLOTS
    page = 1 << 16
    for i in range(slots + 1):  # 64 KiB slices of the one memfd, one slot each
        c.send(Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(i * page, page, UVA_BASE + i * page, i * page),
                                              fe.mem.fd))


# vring index >= number of queues, in every per-ring request


def _index_case(name: str, send: Case, index: int = NUM_QUEUES) -> None:
    send.__name__ = name
    case(rf"vring index {index} is not below the {NUM_QUEUES} queues supported")(send)


_index_case("vring_num_index_u32_max", index=0xFFFF_FFFF, send=lambda fe: fe.client.send_raw(
    encode_frame(Request.SET_VRING_NUM, V1, struct.pack("<II", 0xFFFF_FFFF, 64))))
_index_case("vring_addr_index_past_the_queues", lambda fe: fe.client.send(
    Request.SET_VRING_ADDR, VringAddr(NUM_QUEUES, VringAddrFlags(0), 0, 0, 0, 0)))
_index_case("vring_base_index_past_the_queues", lambda fe: fe.client.send(
    Request.SET_VRING_BASE, VringState(NUM_QUEUES, 0)))
_index_case("get_vring_base_index_past_the_queues", lambda fe: fe.client.send(
    Request.GET_VRING_BASE, VringState(NUM_QUEUES, 0)))
_index_case("vring_enable_index_past_the_queues", lambda fe: fe.client.send(
    Request.SET_VRING_ENABLE, VringState(NUM_QUEUES, 1)))
_index_case("vring_kick_index_past_the_queues", lambda fe: send_fds(
    fe.client, encode_frame(Request.SET_VRING_KICK, V1, vring_fd_word(NUM_QUEUES)), 1))
_index_case("vring_call_index_255", index=255, send=lambda fe: send_fds(
    fe.client, encode_frame(Request.SET_VRING_CALL, V1, vring_fd_word(255)), 1))
_index_case("vring_err_index_past_the_queues_nofd", lambda fe: fe.client.send_raw(
    encode_frame(Request.SET_VRING_ERR, V1, vring_fd_word(NUM_QUEUES, nofd=True))))


# SET_VRING_NUM: 0, not a power of two for split, above 32768 (and above the device's maximum)


def _num_case(name: str, num: int) -> None:
    def send(fe: NetFrontend) -> None:
        fe.client.send(Request.SET_VRING_NUM, VringState(1, num))
    send.__name__ = name
    case(rf"SET_VRING_NUM: ring 1 size {num} is not in 1\.\.1024")(send)


_num_case("vring_num_0", 0)
_num_case("vring_num_above_the_device_maximum", 2048)
_num_case("vring_num_32769", 32769)
_num_case("vring_num_65536", 65536)
_num_case("vring_num_u32_max", 0xFFFF_FFFF)


@case(r"ring 1: split ring size 100 is not a power of two")
def vring_num_not_a_power_of_two_for_a_split_ring(fe: NetFrontend) -> None:
    negotiated(fe)
    ring_msgs(fe, num=100, desc=0x1000, avail=0x3000, used=0x4000)


# ring addresses outside mapped memory, straddling its end, wrapping, misaligned, overlapping

MEM_END = 4 << 20  # NetFrontend's guest memory size


def _addr_case(name: str, reason: str, packed: bool = False, **addrs: int) -> None:
    def send(fe: NetFrontend) -> None:
        negotiated(fe, packed=packed)
        ring_msgs(fe, **addrs)
    send.__name__ = name
    case(reason)(send)


OUTSIDE = r"SET_VRING_ADDR: ring 1 {} area at 0x[0-9a-f]+ \(\+0x[0-9a-f]+\) is outside the frontend's memory"
_addr_case("avail_ring_outside_memory", OUTSIDE.format("driver"), avail=MEM_END + 0x1000)
_addr_case("used_ring_outside_memory", OUTSIDE.format("device"), used=MEM_END + 0x1000)
_addr_case("descriptor_table_straddles_the_end_of_memory", OUTSIDE.format("descriptor"), desc=MEM_END - 0x200)
_addr_case("used_ring_below_the_region", OUTSIDE.format("device"), used=-0x1000)
_addr_case("descriptor_table_wrapping_64_bits", OUTSIDE.format("descriptor"), desc=(1 << 64) - UVA_BASE - 0x10)
_addr_case("descriptor_table_misaligned", r"desc area at 0x1008 is not 16-byte aligned", desc=0x1008)
_addr_case("avail_ring_misaligned", r"avail area at 0x2001 is not 2-byte aligned", avail=0x2001)
_addr_case("used_ring_misaligned", r"used area at 0x3002 is not 4-byte aligned", used=0x3002)
_addr_case("packed_descriptor_ring_misaligned", r"desc area at 0x1004 is not 16-byte aligned",
           packed=True, desc=0x1004)
_addr_case("ring_areas_overlap", r"split ring areas overlap", used=0x1200)
_addr_case("packed_event_area_outside_memory", OUTSIDE.format("device"), packed=True, used=MEM_END)


# SET_VRING_BASE beyond the ring (packed: indices are slot numbers, below the ring size)


@case(r"SET_VRING_BASE: ring 1 avail index 100 is beyond its 64 slots")
def packed_vring_base_avail_index_beyond_the_ring(fe: NetFrontend) -> None:
    negotiated(fe, packed=True)
    ring_msgs(fe, base=100 | (1 << 15) | (100 << 16) | (1 << 31))


@case(r"SET_VRING_BASE: ring 1 used index 70 is beyond its 64 slots")
def packed_vring_base_used_index_beyond_the_ring(fe: NetFrontend) -> None:
    negotiated(fe, packed=True)
    ring_msgs(fe, base=3 | (1 << 15) | (70 << 16) | (1 << 31))


# other header-level faults


@case(r"a request carries the REPLY flag")
def request_with_the_reply_flag(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_FEATURES, 0x5))


@case(r"header version 2, expected 1")
def header_version_2(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(Request.GET_FEATURES, 0x2))


@case(r"request code 0 is not a request")
def request_code_0(fe: NetFrontend) -> None:
    fe.client.send_raw(encode_frame(0, V1))


@case(r"SET_VRING_ENABLE: enable value 2 is neither 0 nor 1")
def vring_enable_2(fe: NetFrontend) -> None:
    fe.client.send(Request.SET_VRING_ENABLE, VringState(0, 2))


@case(r"SET_PROTOCOL_FEATURES acks bits 0x80000000 that were never offered")
def protocol_feature_never_offered(fe: NetFrontend) -> None:
    fe.client.call(Request.GET_PROTOCOL_FEATURES)
    fe.client.send(Request.SET_PROTOCOL_FEATURES, Features(1 << 31))


@case(r"SET_FEATURES changes the features .* while rings run")
def features_changed_while_a_ring_runs(fe: NetFrontend) -> None:
    negotiated(fe)
    fe.setup_ring(1)
    fe.client.send(Request.SET_FEATURES, Features(int(Feature.VERSION_1) | BIT30))


@case(r"SET_VRING_NUM: ring 1 is running")
def vring_num_changed_while_the_ring_runs(fe: NetFrontend) -> None:
    negotiated(fe)
    fe.setup_ring(1)
    fe.client.send(Request.SET_VRING_NUM, VringState(1, 32))


# messages that need a negotiation which has not happened

def _unnegotiated(name: str, reason: str, bug: str) -> object:
    return pytest.param(name, reason, id=name)  # bug: what it was, fixed


BEFORE = [
    _unnegotiated("ring_started_before_set_features", r"before SET_FEATURES",
                  "Backend._maybe_start starts a ring (features 0: legacy layout, no VERSION_1) before "
                  "SET_FEATURES"),
    _unnegotiated("add_mem_reg_without_configure_mem_slots", r"CONFIGURE_MEM_SLOTS",
                  "Backend handles ADD_MEM_REG although CONFIGURE_MEM_SLOTS was not negotiated"),
    _unnegotiated("set_status_without_status", r"STATUS",
                  "Backend handles SET_STATUS although the STATUS protocol feature was not negotiated"),
]


def _before_negotiation(name: str, fe: NetFrontend) -> None:
    c = fe.client
    if name == "ring_started_before_set_features":
        c.call(Request.GET_FEATURES)
        c.send(Request.SET_MEM_TABLE, fe.mem.table())
        ring_msgs(fe)
    elif name == "add_mem_reg_without_configure_mem_slots":
        c.call(Request.GET_PROTOCOL_FEATURES)
        c.send(Request.SET_PROTOCOL_FEATURES, Features(int(ProtocolFeature.REPLY_ACK)))
        c.send(Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(0, fe.mem.size, UVA_BASE, 0), fe.mem.fd))
    elif name == "set_status_without_status":
        c.call(Request.GET_PROTOCOL_FEATURES)
        c.send(Request.SET_PROTOCOL_FEATURES, Features(int(ProtocolFeature.REPLY_ACK)))
        c.send(Request.SET_STATUS, Status(0x0F))
    else:  # pragma: no cover
        raise AssertionError(name)


# --- the tests ---------------------------------------------------------------------------------


def check_hostile(tmp_path, caplog, act: Case, reason: str, timeout: float = 3.0) -> None:
    """Run one hostile front-end against a fresh server; assert the whole contract."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    with serving(tmp_path) as s:
        base = resources()
        fe = NetFrontend(s.path)
        try:
            try:
                act(fe)
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped before it finished sending: fine
            if not fe.client.closed_by_peer(timeout):
                raise KeptConnected("the back-end kept the hostile front-end connected")
        finally:
            fe.close()
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("pyvirtio.vhost_user")
                  and r.levelno >= logging.WARNING]
        assert any(re.search(reason, m) for m in logged), f"no log line matches {reason!r}: {logged}"
        assert s.thread.is_alive() and s.server.listener is not None, "the server stopped listening"
        after = settled(base)
        if after != base:
            raise Leak(f"(fds, memfd maps) {base} before, {after} after the connection")
        good_frontend_works(s.path)
        after = settled(base)
        if after != base:
            raise Leak(f"after the good front-end: {base} -> {after}")


XFAIL: dict[str, object] = {}


@pytest.mark.parametrize("name,reason,act", [
    pytest.param(n, r, a, id=n, marks=[XFAIL[n]] if n in XFAIL else []) for n, r, a in CASES])
def test_hostile_frontend_is_dropped_with_a_logged_reason_and_the_next_one_works(tmp_path, caplog, name,
                                                                                    reason, act):
    check_hostile(tmp_path, caplog, act, reason)


@pytest.mark.parametrize("name,reason", BEFORE)
def test_requests_needing_a_negotiation_that_did_not_happen_are_refused(tmp_path, caplog, name, reason):
    check_hostile(tmp_path, caplog, lambda fe: _before_negotiation(name, fe), reason, timeout=0.5)


# --- inflight regions (virtio-blk's GET/SET_INFLIGHT_FD) -----------------------------------------

BLK_QUEUES = 2
BLK_QSIZE = 128


def _blk_backend(tmp_path) -> Backend:
    """A virtio-blk back-end offering INFLIGHT_SHMFD, or skip saying why not."""
    try:
        from pyvirtio.devices.blk import BlkDevice
    except ImportError:
        pytest.skip("no virtio-blk device yet (src/pyvirtio/devices/blk.py with GET/SET_INFLIGHT_FD)")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    be = Backend(BlkDevice(str(image), num_queues=BLK_QUEUES, io_threads=1))
    if not be.offered_protocol & ProtocolFeature.INFLIGHT_SHMFD:
        be.close()
        pytest.skip("the virtio-blk device does not offer INFLIGHT_SHMFD yet")
    return be


def reply_with_fds(c: Client, request: int):  # type: ignore[no-untyped-def]
    """Read one reply keeping its SCM_RIGHTS fds (`Client.reply` uses recv)."""
    while True:
        msg = c.dec.next_message(expect=request)
        if msg is not None:
            return msg
        data, anc, _flags, _ = c.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        if not data:
            raise ConnectionError("back-end closed the connection")
        fds: list[int] = []
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"<{len(blob) // 4}i", blob[: len(blob) - len(blob) % 4]))
        c.dec.feed(data, fds)


def blk_negotiate(c: Client) -> InflightInfo:
    """Features with INFLIGHT_SHMFD, then GET_INFLIGHT_FD for the device's queues: the reply (with fd)."""
    c.call(Request.GET_FEATURES)
    proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
    c.send(Request.SET_PROTOCOL_FEATURES, Features(proto & int(
        ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.CONFIG)))
    c.send(Request.SET_OWNER)
    c.send(Request.SET_FEATURES, Features(int(Feature.VERSION_1) | BIT30))
    c.send(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, BLK_QUEUES, BLK_QSIZE))
    info = reply_with_fds(c, Request.GET_INFLIGHT_FD).body
    assert isinstance(info, InflightInfo) and info.fd is not None and info.mmap_size > 0
    return info


def _inflight_case(name: str, c: Client, info: InflightInfo) -> None:
    size, fd = info.mmap_size, info.fd
    assert fd is not None
    bad = {
        "set_mmap_size_smaller_than_the_queues_need": InflightInfo(size // 2, 0, BLK_QUEUES, BLK_QSIZE, fd),
        "set_mmap_size_beyond_the_file": InflightInfo(size + (1 << 20), 0, BLK_QUEUES, BLK_QSIZE, fd),
        "set_mmap_offset_beyond_the_file": InflightInfo(size, 1 << 20, BLK_QUEUES, BLK_QSIZE, fd),
        "set_mmap_offset_not_page_aligned": InflightInfo(size, 64, BLK_QUEUES, BLK_QSIZE, fd),
        "set_zero_queues": InflightInfo(size, 0, 0, BLK_QSIZE, fd),
        "set_queue_size_zero": InflightInfo(size, 0, BLK_QUEUES, 0, fd),
        "set_queue_size_above_32768": InflightInfo(size, 0, BLK_QUEUES, 40000, fd),
        "set_more_queues_than_the_buffer_holds": InflightInfo(size, 0, 200, BLK_QSIZE, fd),
    }
    if name in bad:
        c.send(Request.SET_INFLIGHT_FD, bad[name], need_reply=True)
    elif name == "get_more_queues_than_the_device_has":
        c.send(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, BLK_QUEUES + 1, BLK_QSIZE))
    elif name == "get_queue_size_zero":
        c.send(Request.GET_INFLIGHT_FD, InflightInfo(0, 0, BLK_QUEUES, 0))
    elif name == "set_without_its_fd":
        c.send_raw(encode_frame(Request.SET_INFLIGHT_FD, V1, struct.pack("<QQHH4x", size, 0, BLK_QUEUES, BLK_QSIZE)))
    else:  # pragma: no cover
        raise AssertionError(name)
    os.close(fd)


INFLIGHT_CASES = [
    ("set_mmap_size_smaller_than_the_queues_need", r"SET_INFLIGHT_FD: inflight buffer of \d+ bytes cannot hold"),
    ("set_mmap_size_beyond_the_file", r"SET_INFLIGHT_FD: inflight fd holds"),
    ("set_mmap_offset_beyond_the_file", r"SET_INFLIGHT_FD: inflight fd holds"),
    ("set_mmap_offset_not_page_aligned", r"SET_INFLIGHT_FD: inflight buffer offset 64 is not page aligned"),
    ("set_zero_queues", r"SET_INFLIGHT_FD: inflight buffer for 0 queues .* is impossible"),
    ("set_queue_size_zero", r"SET_INFLIGHT_FD: inflight buffer for 2 queues of 0 is impossible"),
    ("set_queue_size_above_32768", r"SET_INFLIGHT_FD: inflight buffer for 2 queues of 40000 is impossible"),
    ("set_more_queues_than_the_buffer_holds", r"SET_INFLIGHT_FD: inflight buffer of \d+ bytes cannot hold 200"),
    ("get_more_queues_than_the_device_has", rf"GET_INFLIGHT_FD for {BLK_QUEUES + 1} queues; the device has"),
    ("get_queue_size_zero", r"GET_INFLIGHT_FD: inflight buffer for 2 queues of 0 is impossible"),
    ("set_without_its_fd", r"SET_INFLIGHT_FD: carries 0 fds, the request requires 1"),
]


@pytest.mark.parametrize("name,reason", [
    pytest.param(n, r, id=n)
    for n, r in INFLIGHT_CASES])
def test_inflight_region_of_the_wrong_size_is_refused(tmp_path, caplog, name, reason):
    """virtio-blk's inflight buffer, wrong in every way a front-end can make
    it wrong: dropped with the reason logged, no fd or mapping kept (the
    back-end's own dup of the fd included), and the next front-end's
    GET/SET_INFLIGHT_FD handshake works."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    be = _blk_backend(tmp_path)
    path = str(tmp_path / "blk.sock")
    srv = Server(be, socket_path=path)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        base = resources()
        c = Client(path)
        try:
            info = blk_negotiate(c)
            _inflight_case(name, c, info)
            if not c.closed_by_peer(3.0):
                raise KeptConnected(f"{name} was accepted")
        finally:
            c.close()
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(re.search(reason, m) for m in logged), f"no log line matches {reason!r}: {logged}"
        after = settled(base)
        if after != base:
            raise Leak(f"(fds, memfd maps) {base} before, {after} after the connection")
        c = Client(path)
        try:
            info = blk_negotiate(c)
            assert c.call(Request.SET_INFLIGHT_FD, info, need_reply=True).body.value == 0  # type: ignore[union-attr]
            assert info.fd is not None
            os.close(info.fd)
            assert c.call(Request.GET_FEATURES).body.value & BIT30  # type: ignore[union-attr]
        finally:
            c.close()
        after = settled(base)
        if after != base:
            raise Leak(f"after the good front-end: {base} -> {after}")
    finally:
        srv.stop()
        t.join(10)
        be.close()


# --- floods -----------------------------------------------------------------------------------


def test_a_frontend_that_never_reads_its_replies_is_dropped_and_does_not_wedge_the_server(tmp_path, caplog):
    """A flood of GET_FEATURES whose replies are never read fills the socket
    buffer. The server must drop that front-end (within a deadline), not block
    in sendmsg forever: a blocked control thread no longer answers SIGTERM
    (`stop()`), so the back-end could not even be shut down."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    with serving(tmp_path) as s:
        base = resources()
        c = Client(s.path, timeout=0.2)
        burst = encode_frame(Request.GET_FEATURES, V1) * 256
        sent = 0
        t0 = time.monotonic()
        try:
            while sent < 200_000 and time.monotonic() - t0 < 5.0:  # bounded in count and time
                c.sock.sendall(burst)
                sent += 256
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading (blocked) or dropped us
        try:
            dropped = _peer_closed_without_reading(c.sock, 2.0)
        finally:
            c.close()  # unwedges a server blocked in sendmsg (EPIPE), so the test itself never hangs
        assert settled(base) == base
        good_frontend_works(s.path)
        assert dropped, f"after {sent} unread requests the server still held the connection"
        assert any("repl" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)


def _peer_closed_without_reading(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closed its end, judged by POLLHUP without draining
    our receive buffer (reading would unblock a wedged server and hide the bug)."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLHUP | select.POLLRDHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _fd, ev in p.poll(50):
            if ev & (select.POLLHUP | select.POLLRDHUP):
                return True
    return False


def test_a_flood_of_legal_messages_is_served_in_bounded_time_without_growth(tmp_path):
    """20,000 requests in bursts (ring setup messages, enables, call-fd
    replacements with fresh eventfds) are all applied; the fd table does not
    grow with them, and a GET_FEATURES sent after the flood is answered
    within a deadline."""
    with serving(tmp_path) as s:
        base = resources()
        fe = NetFrontend(s.path)
        try:
            negotiated(fe)
            c = fe.client
            for i in range(NUM_QUEUES):  # the steady state: one call fd per ring
                efd = os.eventfd(0, os.EFD_CLOEXEC)
                c.send(Request.SET_VRING_CALL, VringFd(i, efd, False))
                os.close(efd)
            assert c.call(Request.GET_FEATURES).body.value & BIT30  # type: ignore[union-attr]
            steady = resources()
            burst = b"".join(encode_request(r, b)[0] for r, b in (
                (Request.SET_VRING_NUM, VringState(0, 64)),
                (Request.SET_VRING_BASE, VringState(0, 0)),
                (Request.SET_VRING_ENABLE, VringState(0, 1)),
                (Request.SET_OWNER, None),
            ))
            t0 = time.monotonic()
            for _ in range(1000):  # 16,000 messages, 16 per sendall
                c.send_raw(burst * 4)
            for i in range(1000):  # 1,000 call-fd replacements, each with a new eventfd
                efd = os.eventfd(0, os.EFD_CLOEXEC)
                c.send(Request.SET_VRING_CALL, VringFd(i % NUM_QUEUES, efd, False))
                os.close(efd)
            assert c.call(Request.GET_FEATURES).body.value & BIT30  # type: ignore[union-attr]
            elapsed = time.monotonic() - t0
            assert elapsed < 20, f"17,000 messages took {elapsed:.1f}s"
            assert resources() == steady, "fds or mappings grew with the flood"
            assert c.call(Request.GET_STATUS).body.value == 0  # type: ignore[union-attr]
        finally:
            fe.close()
        assert settled(base) == base


# --- accepted before negotiation, or unimplemented: no close, no leak --------------------------


def test_per_ring_messages_before_set_features_are_accepted_as_qemu_and_dpdk_send_them(tmp_path, caplog):
    """QEMU sends SET_VRING_ENABLE and SET_VRING_CALL/ERR before SET_FEATURES;
    DPDK's reconnect sends GET_VRING_BASE before GET_FEATURES. Refusing them
    would break real front-ends: they are applied, the connection stays."""
    with serving(tmp_path) as s:
        base = resources()
        c = Client(s.path)
        assert c.call(Request.GET_VRING_BASE, VringState(1, 0)).body == VringState(1, 0)
        c.send(Request.SET_VRING_ENABLE, VringState(0, 1))
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        c.send(Request.SET_VRING_CALL, VringFd(0, efd, False))
        c.send(Request.SET_VRING_ERR, VringFd(1, efd, False))
        os.close(efd)
        assert c.call(Request.GET_FEATURES).body.value & BIT30  # type: ignore[union-attr]
        assert not c.closed_by_peer(0.2)
        c.close()
        assert settled(base) == base
        assert not any("protocol error" in r.getMessage() for r in caplog.records)


def test_unimplemented_requests_carrying_fds_leak_nothing(tmp_path, caplog):
    """SET_LOG_BASE without the LOG_SHMFD protocol feature acked, SET_LOG_FD
    (kept until the connection ends), SET_BACKEND_REQ_FD without the
    BACKEND_REQ protocol feature acked, and an unknown request code, each
    with fds: the fds are closed, the requests ignored (or refused with a
    failure ack), the connection kept."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    with serving(tmp_path) as s:
        base = resources()
        c = Client(s.path)
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto & PROTO))
        send_fds(c, encode_frame(Request.SET_LOG_BASE, V1, struct.pack("<QQ", 4096, 0)), 1)
        send_fds(c, encode_frame(Request.SET_LOG_FD, V1), 1)
        a, b = socket.socketpair()
        c.send_raw(encode_frame(Request.SET_BACKEND_REQ_FD, V1 | 0x8), [b.fileno()])
        a.close()
        b.close()
        assert c.reply(Request.SET_BACKEND_REQ_FD).body.value != 0  # type: ignore[union-attr]
        send_fds(c, encode_frame(99, V1, b"xyz"), 3)
        assert c.call(Request.GET_FEATURES).body.value & BIT30  # type: ignore[union-attr]
        c.close()
        assert settled(base) == base
        assert sum("does not implement" in r.getMessage() for r in caplog.records) == 1
        assert any("SET_LOG_BASE without the negotiated LOG_SHMFD" in r.getMessage() for r in caplog.records)
        assert any("SET_BACKEND_REQ_FD without the negotiated BACKEND_REQ" in r.getMessage()
                   for r in caplog.records)


@pytest.mark.parametrize("size, offset, file_size", [(4096, 0, 0), (1 << 40, 0, 4096), (4096, 8192, 4096)])
def test_a_dirty_log_that_cannot_be_mapped_drops_the_connection_cleanly(tmp_path, caplog, size, offset,
                                                                       file_size):
    """With LOG_SHMFD acked, a SET_LOG_BASE whose log lies outside its file
    (empty, too large, offset beyond the end) cannot be honoured: migrating
    without it would corrupt guest memory silently. The back-end says why,
    drops that connection, leaks nothing and serves the next front-end."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    with serving(tmp_path) as s:
        base = resources()
        c = Client(s.path)
        c.send(Request.SET_PROTOCOL_FEATURES, Features(PROTO | ProtocolFeature.LOG_SHMFD))
        fd = os.memfd_create("bad-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, file_size)
        try:
            c.send_raw(encode_frame(Request.SET_LOG_BASE, V1, struct.pack("<QQ", size, offset)), [fd])
        finally:
            os.close(fd)
        with pytest.raises((ConnectionError, EOFError, OSError)):
            c.reply(Request.SET_LOG_BASE)
        c.close()
        assert settled(base) == base
        assert any("SET_LOG_BASE: cannot map the log" in r.getMessage() for r in caplog.records)
        good_frontend_works(s.path)


def test_split_vring_base_far_from_used_idx_resumes_from_used_idx(tmp_path, caplog):
    """For a split ring SET_VRING_BASE is a free-running u16 and used->idx in
    guest memory is the truth (libvhost-user, DPDK): a base 1000 ahead of a
    64-entry ring is not trusted; the ring resumes from used->idx (logged)
    and works."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    with serving(tmp_path) as s:
        fe = NetFrontend(s.path)
        try:
            fe.negotiate()
            fe.setup_ring(0)
            fe.setup_ring(1, base=1000)
            fe.post_rx(0, 4)
            fe.send_frames(1, frames(3))
            assert len(fe.reap(0, 3)) == 3
        finally:
            fe.close()
        assert any("SET_VRING_BASE 1000 but used->idx is 0" in r.getMessage() for r in caplog.records)


def test_non_power_of_two_packed_ring_is_accepted(tmp_path):
    """The split-ring power-of-two rule does not apply to packed rings (a
    control for the split case above): a 100-entry packed ring works."""
    with serving(tmp_path) as s:
        fe = NetFrontend(s.path, packed=True, queue_size=100)
        try:
            fe.negotiate()
            fe.setup_ring(0)
            fe.setup_ring(1)
            fe.post_rx(0, 10)
            fe.send_frames(1, frames(6))
            assert len(fe.reap(0, 6)) == 6
        finally:
            fe.close()


def test_every_hostile_case_runs_on_one_server_in_a_row(tmp_path, caplog):
    """All the cases above back to back on ONE server: it survives them all,
    serves a good front-end at the end, and has leaked nothing in between."""
    caplog.set_level(logging.INFO, logger="pyvirtio")
    with serving(tmp_path) as s:
        base = resources()
        for name, _reason, act in CASES:
            fe = NetFrontend(s.path)
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    act(fe)
                assert fe.client.closed_by_peer(3.0), name
            finally:
                fe.close()
        assert s.server.connections == len(CASES)
        good_frontend_works(s.path)
        after = settled(base)
        if after != base:
            raise Leak(f"(fds, memfd maps) {base} before, {after} after {len(CASES)} hostile front-ends")


def test_fd_and_mapping_counts_see_a_real_leak():
    """The leak detector itself: an fd and a memfd mapping kept open are seen."""
    base = resources()
    m = Memfd(1 << 20)
    try:
        fds, maps = resources()
        assert fds == base[0] + 2 and maps == base[1] + 1  # the memfd and mmap's own dup of it
    finally:
        m.close()
    assert settled(base) == base
