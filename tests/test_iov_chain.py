"""Long indirect tables built in array form (`IovChain`): the same chain as
the general path, host iovecs that point at the right bytes, and every
hostile table still refused (or taken the general way) exactly as before."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

from pyvirtio.devices import blk as blkmod
from pyvirtio.devices.blk import REQ_HDR, S_IOERR, S_OK, T_IN, T_OUT, BlkDevice
from pyvirtio.memory import GuestMemory, Region
from pyvirtio.queue import QueueError, Virtqueue
from pyvirtio.queue.chain import IOV_MIN_SEGMENTS, IovChain
from pyvirtio.queue.errors import BadBufferAddress, ReadableAfterWritable
from pyvirtio.spec import DescFlags, Feature
from pyvirtio.testing import QueuePair

IOVEC = struct.Struct("<QQ")
RINGS = ["split", "packed"]


def _pair(ring: str, size: int = 256) -> QueuePair:
    return QueuePair(ring, size, event_idx=True, indirect=True, mem_size=8 << 20)


def _fill(p: QueuePair, gpa: int, n: int, seed: int) -> bytes:
    data = bytes((seed + i) & 0xFF for i in range(n))
    p.raw.write(gpa, data)
    return data


def _host_bytes(iov: bytes) -> list[bytes]:
    return [ctypes.string_at(base, n) for base, n in IOVEC.iter_unpack(iov)]


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("outs,ins", [(1, 31), (1, 126), (60, 60), (200, 1), (32, 0), (0, 32)])
def test_long_table_is_an_iov_chain_with_the_same_buffers(ring: str, outs: int, ins: int) -> None:
    p = _pair(ring)
    o = [(p.pool.alloc(100 + i), 100 + i) for i in range(outs)]
    w = [(p.pool.alloc(50 + i), 50 + i) for i in range(ins)]
    expect_r = [_fill(p, a, n, i) for i, (a, n) in enumerate(o)]
    expect_w = [_fill(p, a, n, 7 * i) for i, (a, n) in enumerate(w)]
    p.driver.add(o, w, token="t", indirect=True)
    p.driver.publish()
    (ch,) = p.vq.pop_batch()
    assert type(ch) is IovChain
    assert ch.nr == outs and len(ch.lens) == outs + ins
    assert ch.readable_len == sum(n for _, n in o) and ch.writable_len == sum(n for _, n in w)
    assert [bytes(v) for v in ch.readable] == expect_r
    assert [bytes(v) for v in ch.writable] == expect_w
    assert ch.segments == tuple((a, n, False) for a, n in o) + tuple((a, n, True) for a, n in w)
    # the iovecs name the very bytes of those buffers, in order
    assert _host_bytes(ch.iov) == expect_r + expect_w
    # and the chain completes like any other
    written = min(3, ch.writable_len)
    p.vq.complete(ch, written)
    p.vq.flush()
    assert p.driver.get_used() == [("t", written)]


@pytest.mark.parametrize("ring", RINGS)
def test_short_tables_stay_plain_chains(ring: str) -> None:
    p = _pair(ring)
    ins = [(p.pool.alloc(512), 512) for _ in range(IOV_MIN_SEGMENTS - 3)]  # one entry short
    p.driver.add([(p.pool.alloc(16), 16)], [*ins, (p.pool.alloc(1), 1)], indirect=True)
    p.driver.publish()
    (ch,) = p.vq.pop_batch()
    assert type(ch) is not IovChain and ch.readable_len == 16 and ch.writable_len == 512 * len(ins) + 1


@pytest.mark.parametrize("ring", RINGS)
def test_long_table_with_a_buffer_outside_memory_retires_the_queue(ring: str) -> None:
    p = _pair(ring)
    bufs = [(p.pool.alloc(64), 64) for _ in range(40)]
    bufs[11] = (p.raw.regions[0].size - 8, 64)  # runs past the end of guest memory
    p.driver.add(bufs, [(p.pool.alloc(1), 1)], indirect=True)
    p.driver.publish()
    with pytest.raises(BadBufferAddress):
        p.vq.pop_batch()
    assert p.vq.failed is not None


@pytest.mark.parametrize("ring", RINGS)
def test_long_table_with_readable_after_writable_is_refused(ring: str) -> None:
    p = _pair(ring)
    bufs = [(p.pool.alloc(64), 64) for _ in range(40)]
    # the driver model writes out-then-in; forge the order in the table itself
    p.driver.add(bufs[:20], bufs[20:], indirect=True)
    p.driver.publish()
    head = _table_gpa(p)
    flag_off = 12 if ring == "split" else 14
    write_bit = int(DescFlags.WRITE)
    entry = 3  # a readable entry after writable ones: make entry 2 writable
    raw = bytearray(p.raw.read(head + 16 * (entry - 1) + flag_off, 2))
    raw[0] |= write_bit
    p.raw.write(head + 16 * (entry - 1) + flag_off, bytes(raw))
    with pytest.raises(ReadableAfterWritable):
        p.vq.pop_batch()


def _table_gpa(p: QueuePair) -> int:
    """The indirect table's address in the first ring descriptor."""
    return struct.unpack("<Q", p.raw.read(p.desc, 8))[0]


def test_split_table_with_its_own_link_order_takes_the_general_path() -> None:
    p = _pair("split")
    n = 40
    bufs = [(p.pool.alloc(32), 32) for _ in range(n)]
    datas = [_fill(p, a, ln, i) for i, (a, ln) in enumerate(bufs)]
    # the chain visits entry 0, then n-1, n-2, ..., 1: valid, but not the sequential layout
    entry_of = [0] + list(range(n - 1, 0, -1))  # chain position k -> table entry
    rows = [b""] * n
    for k, e in enumerate(entry_of):
        last = k == n - 1
        nxt = 0 if last else entry_of[k + 1]
        rows[e] = struct.pack("<QIHH", bufs[k][0], 32, 0 if last else int(DescFlags.NEXT), nxt)
    table = b"".join(rows)
    tgpa = p.pool.alloc(len(table))
    p.raw.write(tgpa, table)
    p.raw.write(p.desc, struct.pack("<QIHH", tgpa, len(table), int(DescFlags.INDIRECT), 0))
    avail = p.driver_area
    p.raw.write(avail + 4, struct.pack("<H", 0))
    p.raw.write(avail + 2, struct.pack("<H", 1))
    (ch,) = p.vq.pop_batch()
    assert type(ch) is not IovChain
    assert [bytes(v) for v in ch.readable] == datas  # in link order


def test_table_spanning_two_regions_takes_the_general_path() -> None:
    # two adjacent regions; one buffer straddles the boundary
    a = GuestMemory.anonymous(1 << 20)
    b_region = Region.from_buffer(bytearray(1 << 20), 1 << 20)
    mem = GuestMemory([*a.regions, b_region])
    from pyvirtio.driver import BufferPool, SplitDriver, ring_layout

    desc, drv_area, dev_area, _end = ring_layout(False, 64, 0x1000)
    pool = BufferPool(mem, 0x10000, (1 << 20) - 0x10000)
    drv = SplitDriver(mem, 64, desc, drv_area, dev_area, event_idx=False, indirect=True, pool=pool)
    vq = Virtqueue(mem, 64, desc, drv_area, dev_area,
                   features=int(Feature.VERSION_1 | Feature.RING_INDIRECT_DESC))
    outs = [(pool.alloc(16), 16) for _ in range(38)]
    outs.append(((1 << 20) - 8, 16))  # 8 bytes in each region
    mem.write((1 << 20) - 8, bytes(range(16)))
    drv.add(outs, [(pool.alloc(1), 1)], indirect=True)
    drv.publish()
    (ch,) = vq.pop_batch()
    assert type(ch) is not IovChain
    assert b"".join(bytes(v) for v in ch.readable)[-16:] == bytes(range(16))


def test_packed_save_keeps_an_in_flight_iov_chain_list() -> None:
    p = _pair("packed")
    bufs = [(p.pool.alloc(64), 64) for _ in range(33)]
    p.driver.add(bufs[:1], bufs[1:], token="x", indirect=True)
    p.driver.publish()
    (ch,) = p.vq.pop_batch()
    assert type(ch) is IovChain
    st = p.vq.save()
    assert st.in_flight_lists == ((1, tuple((a, n, i > 0) for i, (a, n) in enumerate(bufs))),)
    vq2 = p.new_device(st)
    (again,) = vq2.pop_batch()
    assert again.id == ch.id and [bytes(v) for v in again.writable] == [bytes(v) for v in ch.writable]


# --- the block device on array-form chains -----------------------------------------------


def _blk(tmp_path: Path, size: int = 1 << 20, **kw: object) -> BlkDevice:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    return BlkDevice(str(path), num_queues=1, io_threads=0, **kw)  # type: ignore[arg-type]


def _request(p: QueuePair, typ: int, sector: int, data_segs: list[int], status_shared: bool = False,
             payload: bytes = b"") -> tuple[list[int], int]:
    """Post one block request with `data_segs` data buffers; returns (data gpas, status gpa)."""
    hdr = p.pool.alloc(16)
    p.raw.write(hdr, REQ_HDR.pack(typ, 0, sector))
    gpas = [p.pool.alloc(n) for n in data_segs]
    if typ == T_OUT:
        off = 0
        for g, n in zip(gpas, data_segs):
            p.raw.write(g, payload[off:off + n])
            off += n
        segs = [(g, n) for g, n in zip(gpas, data_segs)]
        st = p.pool.alloc(1)
        p.driver.add([(hdr, 16), *segs], [(st, 1)], indirect=True)
        return gpas, st
    if status_shared:  # the status byte is the last byte of the last data buffer
        last = p.pool.alloc(data_segs[-1] + 1)
        gpas[-1] = last
        segs = [(g, n) for g, n in zip(gpas, data_segs)]
        segs[-1] = (last, data_segs[-1] + 1)
        p.driver.add([(hdr, 16)], segs, indirect=True)
        return gpas, last + data_segs[-1]
    st = p.pool.alloc(1)
    p.driver.add([(hdr, 16)], [*((g, n) for g, n in zip(gpas, data_segs)), (st, 1)], indirect=True)
    return gpas, st


def _serve_one(p: QueuePair, dev: BlkDevice) -> tuple[object, int]:
    p.driver.publish()
    (ch,) = p.vq.pop_batch()
    r = dev.prepare(ch)
    w = r if isinstance(r, int) else dev.execute(r)
    return ch, w


@pytest.mark.parametrize("status_shared", [False, True])
def test_blk_read_of_many_segments_lands_in_every_buffer(tmp_path: Path, status_shared: bool) -> None:
    dev = _blk(tmp_path)
    p = _pair("split")
    segs = [512 * (1 + i % 3) for i in range(40)]
    gpas, st = _request(p, T_IN, 8, segs, status_shared=status_shared)
    ch, w = _serve_one(p, dev)
    assert type(ch) is IovChain
    disk = Path(dev.path).read_bytes()
    got = b"".join(p.raw.read(g, n) for g, n in zip(gpas, segs))
    assert got == disk[8 * 512 : 8 * 512 + sum(segs)]
    assert p.raw.read(st, 1) == bytes([S_OK]) and w == ch.writable_len
    dev.close()


def test_blk_write_of_many_segments_reaches_the_file(tmp_path: Path) -> None:
    dev = _blk(tmp_path)
    p = _pair("packed")
    segs = [1024] * 33
    payload = os.urandom(sum(segs))
    _, st = _request(p, T_OUT, 100, segs, payload=payload)
    ch, _ = _serve_one(p, dev)
    assert type(ch) is IovChain
    assert p.raw.read(st, 1) == bytes([S_OK])
    assert Path(dev.path).read_bytes()[100 * 512 : 100 * 512 + len(payload)] == payload
    dev.close()


def test_blk_array_form_request_past_the_end_is_an_ioerr(tmp_path: Path) -> None:
    dev = _blk(tmp_path, size=64 * 1024)
    p = _pair("split")
    _, st = _request(p, T_IN, 100, [512] * 40)  # sectors 100..140 of 128
    ch, _ = _serve_one(p, dev)
    assert type(ch) is IovChain and p.raw.read(st, 1) == bytes([S_IOERR])
    dev.close()


def test_blk_read_resumes_a_short_transfer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _blk(tmp_path)
    real = blkmod._preadv
    calls: list[int] = []

    def one_iovec_at_a_time(fd: int, iov: bytes, cnt: int, off: int) -> int:
        calls.append(cnt)
        return real(fd, iov, 1, off)  # a short read: only the first buffer

    monkeypatch.setattr(blkmod, "_preadv", one_iovec_at_a_time)
    monkeypatch.setattr(dev, "execute_cached", lambda r: None)
    p = _pair("split")
    segs = [512, 1024, 1536] * 12
    gpas, st = _request(p, T_IN, 3, segs)
    _serve_one(p, dev)
    disk = Path(dev.path).read_bytes()
    assert b"".join(p.raw.read(g, n) for g, n in zip(gpas, segs)) == disk[3 * 512 : 3 * 512 + sum(segs)]
    assert p.raw.read(st, 1) == bytes([S_OK]) and len(calls) == len(segs)
    dev.close()


def test_blk_direct_io_falls_back_for_unaligned_buffers(tmp_path: Path) -> None:
    dev = _blk(tmp_path, direct=True)
    p = _pair("split")
    # 16-byte aligned buffers: O_DIRECT refuses them (EINVAL), buffered I/O serves them
    segs = [512] * 40
    gpas, st = _request(p, T_IN, 0, segs)
    _serve_one(p, dev)
    disk = Path(dev.path).read_bytes()
    assert b"".join(p.raw.read(g, n) for g, n in zip(gpas, segs)) == disk[: sum(segs)]
    assert p.raw.read(st, 1) == bytes([S_OK])
    dev.close()


def test_blk_cached_read_of_an_iov_chain(tmp_path: Path) -> None:
    dev = _blk(tmp_path)
    p = _pair("split")
    segs = [4096] * 40
    gpas, st = _request(p, T_IN, 16, segs)
    p.driver.publish()
    (ch,) = p.vq.pop_batch()
    r = dev.prepare(ch)
    assert not isinstance(r, int)
    w = dev.execute_cached(r)  # the image was just written: in the page cache
    assert w == ch.writable_len and p.raw.read(st, 1) == bytes([S_OK])
    disk = Path(dev.path).read_bytes()
    assert b"".join(p.raw.read(g, n) for g, n in zip(gpas, segs)) == disk[16 * 512 : 16 * 512 + sum(segs)]
    dev.close()


def test_iov_chain_keeps_guest_memory_mapped_after_the_region_is_dropped() -> None:
    p = _pair("split")
    bufs = [(p.pool.alloc(64), 64) for _ in range(40)]
    datas = [_fill(p, a, n, i) for i, (a, n) in enumerate(bufs)]
    p.driver.add(bufs, [(p.pool.alloc(1), 1)], indirect=True)
    p.driver.publish()
    (ch,) = p.vq.pop_batch()
    assert type(ch) is IovChain
    for r in p.raw.regions:  # what SET_MEM_TABLE does to the old table
        r.close()
    assert _host_bytes(ch.iov)[:40] == datas  # still mapped: the chain holds a view


def test_queue_error_names_the_chain() -> None:
    p = _pair("split")
    bufs = [(p.pool.alloc(64), 64) for _ in range(40)]
    bufs[5] = (1 << 40, 64)
    p.driver.add(bufs, [], indirect=True)
    p.driver.publish()
    with pytest.raises(QueueError, match="chain 0"):
        p.vq.pop_batch()
