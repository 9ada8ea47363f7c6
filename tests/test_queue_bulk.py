"""The vectorised bulk path: same accesses, same results as the per-chain path."""

from __future__ import annotations

import numpy as np
import pytest

from pyvirtio.queue import ArmResult, Chain, HeadOutOfRange
from pyvirtio.queue.bulk import Bulk
from pyvirtio.testing import QueuePair

RINGS = ["split", "packed"]


def _drain_bulk(pair: QueuePair, written: int = 0) -> list:
    got = []
    while True:
        b = pair.vq.pop_bulk(1024)
        if isinstance(b, Bulk):
            got.append(b)
            pair.vq.complete_bulk(b, np.minimum(written, np.where(b.writable, b.lens, 0)))
        elif b:
            got += b
            for c in b:
                pair.vq.complete(c, min(written, c.writable_len))
        else:
            break
        pair.vq.flush()
    return got


@pytest.mark.parametrize("ring", RINGS)
def test_bulk_path_reads_exactly_what_the_chain_path_reads_for_a_steady_driver(ring):
    # split: always identical. packed: the vector flag scan sizes its first
    # chunk from the previous run, so it matches once the run length is known.
    counts = {}
    for mode in ("chain", "bulk"):
        pair = QueuePair(ring, 64, event_idx=True)
        for rnd in range(6):  # crosses the ring end for both formats
            if rnd == 1:
                pair.mem.reset_counts()
            pair.post(30, out=0, in_=16)
            if mode == "chain":
                pair.serve(written=16)
            else:
                got = _drain_bulk(pair, 16)
                assert all(isinstance(g, Bulk) for g in got)
            assert [w for _, w in pair.driver.get_used()] == [16] * 30
            assert pair.vq.arm() is ArmResult.SLEEP
        snap = pair.counts()
        counts[mode] = (snap["metadata_reads"], snap["metadata_writes"], snap["fences"],
                        snap["metadata_bytes_read"], snap["metadata_bytes_written"])
    assert counts["chain"] == counts["bulk"]


@pytest.mark.parametrize("ring", RINGS)
def test_bulk_views_are_the_guest_buffers(ring):
    pair = QueuePair(ring, 16)
    gpas = pair.post(8, out=4)
    for i, g in enumerate(gpas):
        pair.raw.write(g, bytes([i]) * 4)
    b = pair.vq.pop_bulk()
    assert isinstance(b, Bulk) and len(b) == 8
    assert [bytes(v) for v in b.views()] == [bytes([i]) * 4 for i in range(8)]
    assert int(b.lens.sum()) == 32 and not b.writable.any()
    pair.vq.complete_bulk(b)
    assert pair.vq.flush() is True
    assert sorted(t for t, _ in pair.driver.get_used()) == list(range(8))


@pytest.mark.parametrize("ring", RINGS)
def test_a_run_with_a_multi_descriptor_chain_falls_back_to_chains_in_ring_order(ring):
    pair = QueuePair(ring, 16)
    pair.post(2)
    pair.post(1, segments=3)
    pair.post(2)
    got = pair.vq.pop_bulk()
    assert isinstance(got, list) and all(isinstance(c, Chain) for c in got)
    assert [c.readable_len for c in got] == [64, 64, 192, 64, 64]
    for c in got:
        pair.vq.complete(c, 0)
    pair.vq.flush()
    assert len(pair.driver.get_used()) == 5


def test_a_bad_head_in_a_bulk_run_returns_the_good_chains_then_retires_the_queue():
    pair = QueuePair("split", 8)
    pair.post(3)
    # corrupt the third avail entry
    pair.raw.write(pair.driver_area + 4 + 2 * 2, (200).to_bytes(2, "little"))
    got = pair.vq.pop_bulk()
    assert [c.id for c in got] == [0, 1]
    with pytest.raises(HeadOutOfRange):
        pair.vq.pop_bulk()
    assert pair.vq.pop_bulk() == [] and pair.vq.arm() is ArmResult.SLEEP
    for c in got:
        pair.vq.complete(c, 0)
    pair.vq.flush()
    assert len(pair.driver.get_used()) == 2  # work taken before the error still completes


@pytest.mark.parametrize("ring", RINGS)
def test_save_with_a_bulk_in_flight_resumes_every_buffer(ring):
    pair = QueuePair(ring, 16)
    pair.post(6, out=0, in_=8)
    b = pair.vq.pop_bulk()
    assert isinstance(b, Bulk)
    st = pair.vq.save()
    assert len(st.in_flight) == 6
    vq2 = pair.new_device(st)
    again = vq2.pop_batch()
    assert sorted(c.id for c in again) == sorted(b.ids.tolist())
    for c in again:
        c.write(b"z" * 8)
        vq2.complete(c, 8)
    vq2.flush()
    assert sorted(pair.driver.get_used()) == [(i, 8) for i in range(6)]


def test_complete_bulk_refuses_more_bytes_than_the_buffers_hold():
    pair = QueuePair("split", 8)
    pair.post(2, out=0, in_=8)
    b = pair.vq.pop_bulk()
    with pytest.raises(ValueError):
        pair.vq.complete_bulk(b, 9)
    pair.vq.complete_bulk(b, 8)
    with pytest.raises(ValueError):
        pair.vq.complete_bulk(b, 0)  # twice


def test_complete_bulk_with_one_length_refuses_read_only_buffers_and_negative_lengths():
    pair = QueuePair("split", 8)
    pair.post(2, out=16)  # device-readable: the device may write nothing
    b = pair.vq.pop_bulk()
    for bad in (1, -1):
        with pytest.raises(ValueError):
            pair.vq.complete_bulk(b, bad)
    pair.vq.complete_bulk(b, 0)
    pair.vq.flush()
    assert sorted(pair.driver.get_used()) == [(0, 0), (1, 0)]


@pytest.mark.parametrize("ring", RINGS)
def test_bulk_fill_copies_one_payload_into_every_buffer_and_refuses_what_cannot_take_it(ring):
    """`Bulk.fill` (a generator's frame into a batch of receive buffers; C
    with the compiled engine, slices in pure Python): every buffer gets the
    payload at its start and nothing past it; a batch with a buffer too
    short, or one the device may only read, is refused with nothing written."""
    pair = QueuePair(ring, 16)
    gpas = pair.post(6, out=0, in_=80)
    for g in gpas:
        pair.raw.write(g, b"\xEE" * 80)
    b = pair.vq.pop_bulk(16)
    assert isinstance(b, Bulk) and b.len_summary() == (80, 80, 480)
    payload = bytes(range(60))
    b.fill(payload)
    for g in gpas:
        assert pair.raw.read(g, 80) == payload + b"\xEE" * 20
    with pytest.raises(ValueError):
        b.fill(bytes(81))  # longer than the buffers
    assert all(pair.raw.read(g, 80) == payload + b"\xEE" * 20 for g in gpas)
    pair.vq.complete_bulk(b, 60)
    pair.vq.flush()
    assert [w for _, w in pair.driver.get_used()] == [60] * 6
    # device-readable buffers: refused, untouched
    gpas = pair.post(3, out=40)
    originals = [pair.raw.read(g, 40) for g in gpas]
    b = pair.vq.pop_bulk(16)
    assert isinstance(b, Bulk)
    with pytest.raises(ValueError):
        b.fill(b"x" * 10)
    assert [pair.raw.read(g, 40) for g in gpas] == originals


@pytest.mark.parametrize("ring", RINGS)
def test_bulk_frames_copies_the_readable_buffers_in_bounds_and_ors_their_first_two_bytes(ring):
    """`Bulk.frames` (a loopback's tx batch; C with the compiled engine):
    copies of the device-readable buffers whose length is in bounds, in ring
    order; a buffer the device may write, or out of bounds, is left out."""
    pair = QueuePair(ring, 16)
    sizes = [20, 5, 30, 200, 12]
    data = [bytes([i, i & 1]) + bytes([0x40 + i]) * (n - 2) for i, n in enumerate(sizes)]
    for i, (n, d) in enumerate(zip(sizes, data)):
        g = pair.pool.alloc(n)
        pair.raw.write(g, d)
        pair.driver.add([(g, n)], [], token=i)
    pair.driver.add([], [(pair.pool.alloc(40), 40)], token="writable")
    pair.driver.publish()
    b = pair.vq.pop_bulk(16)
    assert isinstance(b, Bulk) and b.n == 6
    frames, lead = b.frames(10, 100)
    assert frames == [data[0], data[2], data[4]]
    assert lead == 0 | 2 | 4  # first bytes 0, 2, 4; second bytes 0
    assert b.frames() == (data, (0 | 1 | 2 | 3 | 4) | 1 << 8)  # buffers 1 and 3 have a second byte 1


@pytest.mark.parametrize("ring", RINGS)
def test_bulk_scatter_copies_a_frame_into_each_buffer_or_writes_nothing(ring):
    """`Bulk.scatter` (a loopback's frames into a batch of receive buffers):
    frame i at the start of buffer i with the patch over it, the lengths
    summed; a batch with a buffer shorter than its frame, or read-only, is
    refused (None) and left untouched."""
    pair = QueuePair(ring, 16)
    gpas = pair.post(4, out=0, in_=64)
    for g in gpas:
        pair.raw.write(g, b"\xEE" * 64)
    b = pair.vq.pop_bulk(16)
    assert isinstance(b, Bulk) and b.n == 4
    frames = [bytes([i]) * (20 + 10 * i) for i in range(4)]
    assert b.scatter([*frames[:3], bytes(65)], 10, b"\x01\x00") is None  # the last does not fit
    assert [pair.raw.read(g, 64) for g in gpas] == [b"\xEE" * 64] * 4
    with pytest.raises(ValueError):
        b.scatter(frames[:3])  # one frame per buffer
    assert b.scatter(frames, 10, b"\x01\x00") == (20, 50, 140)
    for g, f in zip(gpas, frames):
        assert pair.raw.read(g, 64) == f[:10] + b"\x01\x00" + f[12:] + b"\xEE" * (64 - len(f))
    pair.vq.complete_bulk(b, np.array([len(f) for f in frames], np.uint32))
    pair.vq.flush()
    assert [w for _, w in pair.driver.get_used()] == [20, 30, 40, 50]
    pair.post(2, out=64)  # device-readable: refused
    b = pair.vq.pop_bulk(16)
    assert isinstance(b, Bulk) and b.scatter([b"x" * 8, b"y" * 8]) is None


@pytest.mark.parametrize("ring", RINGS)
def test_a_bulk_knows_whether_every_buffer_is_device_writable(ring):
    """`Bulk.flags_and()` (taken by the ring scan on the way, or one
    reduction): the AND of the flags the device acts on, whatever mix of
    directions the run holds; completing with written bytes needs it."""
    pair = QueuePair(ring, 16)
    for mix in ([True] * 5, [True, False, True], [False] * 4):
        for k, w in enumerate(mix):
            g = pair.pool.alloc(64)
            pair.driver.add([], [(g, 64)], token=k) if w else pair.driver.add([(g, 64)], [], token=k)
        pair.driver.publish()
        b = pair.vq.pop_bulk(16)
        assert isinstance(b, Bulk) and b.n == len(mix)
        assert b.flags_and() == int(np.bitwise_and.reduce(b.flags))
        assert bool(b.flags_and() & 0x2) == all(mix)
        if all(mix):
            pair.vq.complete_bulk(b, 10)
        else:
            with pytest.raises(ValueError):
                pair.vq.complete_bulk(b, 10)  # bytes "written" into a read-only buffer
            pair.vq.complete_bulk(b, 0)
        pair.vq.flush()
        pair.driver.get_used()


def _frame(i: int, n: int) -> bytes:
    return bytes(2) + bytes([0x30 + i]) * (n - 2)  # a header that asks for no offload


@pytest.mark.parametrize("ring", RINGS)
def test_bulk_forward_copies_each_tx_buffer_into_an_rx_buffer_or_writes_nothing(ring):
    """`Bulk.forward_into` (a loopback's tx batch straight into rx buffers):
    buffer i into buffer i with the patch over it; refused (None), every rx
    buffer untouched, when a frame does not fit, is out of [lo, hi], asks
    for an offload, or a buffer has the wrong direction."""
    tx, rx = QueuePair(ring, 16), QueuePair(ring, 16)
    sizes = [20, 30, 40, 50]
    src = [tx.pool.alloc(64) for _ in sizes]
    for i, (g, n) in enumerate(zip(src, sizes)):
        tx.raw.write(g, _frame(i, n))
        tx.driver.add([(g, n)], [], token=i)
    tx.driver.publish()
    tb = tx.vq.pop_bulk(16)
    assert isinstance(tb, Bulk)
    dst = rx.post(4, out=0, in_=64)
    for g in dst:
        rx.raw.write(g, b"\xEE" * 64)
    rb = rx.vq.pop_bulk(16)
    assert isinstance(rb, Bulk) and rb.n == 4
    untouched = [b"\xEE" * 64] * 4
    assert tb.forward_into(rb, 0, 49) is None  # the last is longer than hi
    assert tb.forward_into(rb, 21, 64) is None  # the first is shorter than lo
    tx.raw.write(src[2], b"\x01")  # NEEDS_CSUM: the queue must look at it
    assert tb.forward_into(rb) is None
    tx.raw.write(src[2], b"\x00")
    short = rb.lens.copy()
    short[3] = 49  # one receive buffer too short
    assert tb.forward_into(Bulk(rb.ids, 0, 0x10000, rb.addrs, short, rb.flags, rb.region_gpa, rb.region_mv)) is None
    assert [rx.raw.read(g, 64) for g in dst] == untouched
    assert rb.forward_into(tb) is None  # wrong directions both ways: nothing written
    assert [tx.raw.read(g, n) for g, n in zip(src, sizes)] == [_frame(i, n) for i, n in enumerate(sizes)]
    with pytest.raises(ValueError):
        tb.forward_into(Bulk(rb.ids[:3], 0, 0x10000, rb.addrs[:3], rb.lens[:3], rb.flags[:3], rb.region_gpa,
                             rb.region_mv))  # one receive buffer per frame
    assert tb.forward_into(rb, 12, 64, 10, b"\x01\x00") == (20, 50, 140)
    for i, (g, n) in enumerate(zip(dst, sizes)):
        f = _frame(i, n)
        assert rx.raw.read(g, 64) == f[:10] + b"\x01\x00" + f[12:] + b"\xEE" * (64 - n)


def test_bulk_forward_between_overlapping_buffers_copies_each_source_whole():
    """The guest picks both buffers: an rx buffer overlapping its tx buffer
    gets the frame as it was before the copy (memmove, not garbage)."""
    pair = QueuePair("split", 16)
    base = pair.pool.alloc(256)
    frame = bytes(2) + bytes(range(1, 99))
    pair.raw.write(base, frame)
    tb = Bulk(np.array([0], np.uint16), 0, 0x10000, np.array([base], np.uint64), np.array([100], np.uint32),
              np.array([0], np.uint16), 0, pair.raw.regions[0].mv)
    rb = Bulk(np.array([1], np.uint16), 1, 0x10000, np.array([base + 40], np.uint64), np.array([120], np.uint32),
              np.array([2], np.uint16), 0, pair.raw.regions[0].mv)
    assert tb.forward_into(rb) == (100, 100, 100)
    assert pair.raw.read(base + 40, 100) == frame


@pytest.mark.parametrize("ring", RINGS)
def test_unbulk_puts_each_buffer_in_flight_on_its_own(ring):
    """A device that cannot use a whole `Bulk` takes it apart: each buffer
    completes on its own (in any order), the bulk is no longer in flight."""
    pair = QueuePair(ring, 16)
    pair.post(3, out=0, in_=64)
    b = pair.vq.pop_bulk(16)
    assert isinstance(b, Bulk)
    chains = pair.vq.unbulk(b)
    assert [len(c.writable[0]) for c in chains] == [64] * 3
    with pytest.raises(ValueError):
        pair.vq.complete_bulk(b, 0)
    with pytest.raises(ValueError):
        pair.vq.unbulk(b)
    pair.vq.complete_batch([(chains[2], 7), (chains[0], 5)])
    pair.vq.complete(chains[1], 6)
    pair.vq.flush()
    assert sorted(pair.driver.get_used()) == [(0, 5), (1, 6), (2, 7)]


@pytest.mark.parametrize("ring", RINGS)
def test_batches_in_flight_together_keep_their_own_flags(ring):
    # A batch popped while another is still in flight: each keeps the
    # direction of its own buffers (what its used entries report), whatever
    # the ring scanned since.
    pair = QueuePair(ring, 64)
    tx = [pair.pool.alloc(64) for _ in range(4)]
    for g in tx:
        pair.driver.add([(g, 64)], [])
    pair.driver.publish()
    a = pair.vq.pop_bulk(64)
    for _ in range(4):
        pair.driver.add([], [(pair.pool.alloc(64), 64)])
    pair.driver.publish()
    b = pair.vq.pop_bulk(64)
    assert isinstance(a, Bulk) and isinstance(b, Bulk)
    assert a.writable.tolist() == [False] * 4 and b.writable.tolist() == [True] * 4
    pair.vq.complete_bulk(b, 10)
    pair.vq.complete_bulk(a, 0)
    pair.vq.flush()
    assert sorted(n for _, n in pair.driver.get_used()) == [0] * 4 + [10] * 4


def test_a_bulk_made_from_descriptor_records_reads_its_columns_from_them():
    """`Bulk(..., recs, flags_at)` without columns: each column, when first
    asked for, is the records' field (packed: id and flags at 12 and 14;
    split: flags at 12, the ids given); what cannot describe a batch is
    refused."""
    from pyvirtio.queue.bulk import PACKED_DESC_DTYPE, SPLIT_DESC_DTYPE

    mv = memoryview(bytearray(4096))
    packed = np.zeros(3, PACKED_DESC_DTYPE)
    packed["addr"], packed["len"], packed["id"], packed["flags"] = [16, 80, 160], [60, 70, 80], [7, 3, 5], [2, 0, 2]
    b = Bulk(None, 0, 8, None, None, None, 0, mv, None, -1, bytearray(packed.tobytes()), 14)
    assert (b.n, b.ids.tolist(), b.addrs.tolist(), b.lens.tolist(), b.flags.tolist()) == \
        (3, [7, 3, 5], [16, 80, 160], [60, 70, 80], [2, 0, 2])
    assert b.writable.tolist() == [True, False, True] and b.len_summary() == (60, 80, 210)
    split = np.zeros(2, SPLIT_DESC_DTYPE)
    split["addr"], split["len"], split["flags"], split["next"] = [32, 96], [10, 20], [2, 2], [9, 9]
    heads = np.array([4, 1], np.uint16)
    b = Bulk(heads, 0, 0x10000, None, None, None, 0, mv, None, -1, bytearray(split.tobytes()), 12)
    assert (b.ids.tolist(), b.addrs.tolist(), b.lens.tolist(), b.flags.tolist()) == ([4, 1], [32, 96], [10, 20], [2, 2])
    recs = bytearray(split.tobytes())
    b = Bulk(None, 0, 0x10000, None, None, None, 0, mv, None, -1, recs, 12, bytearray(heads.tobytes()))
    assert (b.n, b.ids.tolist(), b.lens.tolist()) == (2, [4, 1], [10, 20])  # the ids from the heads' bytes
    for bad in [
        lambda: Bulk(None, 0, 0x10000, None, None, None, 0, mv, None, -1, recs, 12),  # split records carry no ids
        lambda: Bulk(heads, 0, 0x10000, None, None, None, 0, mv, None, -1, recs, 12, bytearray(4)),  # ids twice
        lambda: Bulk(None, 0, 0x10000, None, None, None, 0, mv, None, -1, recs, 12, bytearray(2)),  # a head short
        lambda: Bulk(None, 0, 8, None, None, None, 0, mv, None, -1, recs, 14, bytearray(4)),  # packed: ids inside
        lambda: Bulk(heads, 0, 0x10000, None, None, None, 0, mv, None, -1, recs, 13),  # flags at neither offset
        lambda: Bulk(heads, 0, 0x10000, None, None, None, 0, mv, None, -1, recs[:-1], 12),  # not whole records
        lambda: Bulk(heads, 0, 0x10000, None, b.lens, b.flags, 0, mv),  # no records, a column missing
    ]:
        with pytest.raises(ValueError):
            bad()
