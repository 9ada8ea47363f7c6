"""A small vhost-user front-end for the back-end tests: the codec's encoder,
its `ReplyDecoder`, the driver model and memfd guest memory. Nothing more
than the tests need; the full front-end is `pyvirtio.driver.frontend`."""

from __future__ import annotations

import array
import os
import socket
import time
from dataclasses import dataclass, field

from pyvirtio.driver import BufferPool, PackedDriver, SplitDriver, ring_layout
from pyvirtio.memory import GuestMemory, Region
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import (
    Features,
    MemoryRegion,
    Message,
    ReplyDecoder,
    Request,
    SetMemTable,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    encode_request,
)

#: the front-end's virtual address of guest-physical 0 (differs from gpa on purpose)
UVA_BASE = 0x7F00_0000_0000
HDR = 12


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Memfd:
    """Guest memory backed by a memfd we keep open (to pass to the back-end)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = GuestMemory([Region.from_fd(self.fd, 0, size, UVA_BASE)])

    def table(self) -> SetMemTable:
        return SetMemTable((MemoryRegion(0, self.size, UVA_BASE, 0),), (self.fd,))

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class Client:
    """One connection to a back-end."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.dec = ReplyDecoder()

    def send(self, request: int, body: object = None, need_reply: bool = False) -> None:
        data, fds = encode_request(request, body, need_reply)  # type: ignore[arg-type]
        self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def reply(self, request: int) -> Message:
        while True:
            msg = self.dec.next_message(expect=request)
            if msg is not None:
                return msg
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("back-end closed the connection")
            self.dec.feed(data)

    def call(self, request: int, body: object = None, need_reply: bool = False) -> Message:
        self.send(request, body, need_reply)
        return self.reply(request)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the back-end has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
        self.dec.close()


@dataclass
class Ring:
    driver: SplitDriver | PackedDriver
    kick: int
    call: int
    addrs: tuple[int, int, int]


@dataclass
class NetFrontend:
    """Negotiates with a net back-end and drives its rings in this process."""

    path: str
    packed: bool = False
    event_idx: bool = True
    queue_size: int = 64
    mem_size: int = 4 << 20
    features: int = 0
    client: Client = field(init=False)
    mem: Memfd = field(init=False)
    rings: dict[int, Ring] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client = Client(self.path)
        self.mem = Memfd(self.mem_size)
        self.pool = BufferPool(self.mem.mem, 1 << 20, self.mem_size - (1 << 20))
        self._next_ring = 0x1000

    def negotiate(self, extra: int = 0) -> int:
        c = self.client
        offered = c.call(Request.GET_FEATURES).body.value  # type: ignore[union-attr]
        want = int(Feature.VERSION_1) | (1 << 30) | extra
        if self.packed:
            want |= Feature.RING_PACKED
        if self.event_idx:
            want |= Feature.RING_EVENT_IDX
        assert want & offered == want, f"{want:#x} not offered in {offered:#x}"
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto & 0b1_0000_0000_0000_1001))  # MQ|REPLY_ACK|STATUS
        c.send(Request.SET_OWNER)
        c.send(Request.SET_FEATURES, Features(want))
        self.features = want
        ack = c.call(Request.SET_MEM_TABLE, self.mem.table(), need_reply=True)
        assert ack.body.value == 0  # type: ignore[union-attr]
        return offered

    def setup_ring(self, index: int, base: int = 0, enable: bool = True) -> Ring:
        c = self.client
        q = self.queue_size
        desc, drv, dev, end = ring_layout(self.packed, q, self._next_ring)
        self._next_ring = (end + 0xFFF) & ~0xFFF
        cls = PackedDriver if self.packed else SplitDriver
        driver = cls(self.mem.mem, q, desc, drv, dev, event_idx=self.event_idx, pool=self.pool)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        c.send(Request.SET_VRING_NUM, VringState(index, q))
        c.send(Request.SET_VRING_BASE, VringState(index, driver.vring_base() if base == 0 else base))
        c.send(Request.SET_VRING_ADDR, VringAddr(index, VringAddrFlags(0), UVA_BASE + desc, UVA_BASE + dev,
                                                 UVA_BASE + drv, 0))
        c.send(Request.SET_VRING_CALL, VringFd(index, call, False))
        c.send(Request.SET_VRING_KICK, VringFd(index, kick, False))
        if enable:  # acked: the ring is enabled before we post buffers
            assert c.call(Request.SET_VRING_ENABLE, VringState(index, 1), need_reply=True).body.value == 0  # type: ignore[union-attr]
        ring = Ring(driver, kick, call, (desc, drv, dev))
        self.rings[index] = ring
        return ring

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick, 1)

    def send_frames(self, index: int, frames: list[bytes]) -> list[int]:
        """Post tx buffers (header + frame) and kick if asked; returns gpas."""
        ring = self.rings[index]
        gpas = []
        for f in frames:
            data = bytes(HDR) + f
            gpa = self.pool.alloc(len(data))
            self.mem.mem.write(gpa, data)
            ring.driver.add([(gpa, len(data))], [], gpa)
            gpas.append(gpa)
        if ring.driver.publish():
            self.kick(index)
        return gpas

    def post_rx(self, index: int, count: int, size: int = 2048) -> None:
        ring = self.rings[index]
        for _ in range(count):
            gpa = self.pool.alloc(size)
            ring.driver.add([], [(gpa, size)], gpa)
        if ring.driver.publish():
            self.kick(index)

    def reap(self, index: int, want: int, timeout: float = 5.0) -> list[tuple[object, int]]:
        ring = self.rings[index]
        got: list[tuple[object, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            used = ring.driver.get_used()
            if used:
                got.extend(used)
                continue
            time.sleep(0.001)
        return got

    def get_vring_base(self, index: int) -> int:
        return self.client.call(Request.GET_VRING_BASE, VringState(index, 0)).body.num  # type: ignore[union-attr]

    def close(self) -> None:
        self.client.close()
        for r in self.rings.values():
            os.close(r.kick)
            os.close(r.call)
        self.rings.clear()
        self.mem.close()
