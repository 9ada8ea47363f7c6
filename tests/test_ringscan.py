"""The split ring's C batch scan (`pyvirtio._ringscan`) against the numpy
reference it replaces: the same heads, descriptors and summaries on random
rings (wrapping, hostile lengths and addresses), the first out-of-range head
found without reading a descriptor, used elements written where the numpy
path writes them, and every buffer or geometry it is not given refused with
an error instead of a read or write outside it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.queue.bulk import SPLIT_DESC_DTYPE

ringscan = pytest.importorskip("pyvirtio._ringscan", reason="the C ring scan was not built")

U64_MAX = (1 << 64) - 1


def _rings(q: int, heads: list[int], table: list[tuple[int, int, int, int]]) -> tuple[bytearray, bytearray]:
    avail = bytearray(6 + 2 * q)
    np.frombuffer(avail, np.uint16, q, 4)[:] = heads
    desc = bytearray(16 * q)
    np.frombuffer(desc, SPLIT_DESC_DTYPE, q)[:] = table
    return avail, desc


@st.composite
def ring_batches(draw: st.DrawFn) -> tuple[int, int, int, list[int], list[tuple[int, int, int, int]]]:
    q = draw(st.sampled_from([1, 2, 4, 16, 256]))
    n = draw(st.integers(0, q))
    start = draw(st.integers(0, q - 1))
    heads = draw(st.lists(st.integers(0, q - 1), min_size=q, max_size=q))
    addr = st.one_of(st.integers(0, 1 << 20), st.integers(U64_MAX - (1 << 20), U64_MAX))
    table = draw(st.lists(st.tuples(addr, st.integers(0, (1 << 32) - 1), st.integers(0, 0xFFFF),
                                    st.integers(0, 0xFFFF)), min_size=q, max_size=q))
    return q, n, start, heads, table


@settings(max_examples=300, deadline=None)
@given(ring_batches())
def test_gather_matches_the_numpy_scan(batch: tuple[int, int, int, list[int], list[tuple[int, int, int, int]]]) -> None:
    q, n, start, heads, table = batch
    avail, desc = _rings(q, heads, table)
    out_heads = np.empty(n, np.uint16)
    out_descs = np.empty(n, SPLIT_DESC_DTYPE)
    bad, flags_or, amin, emax, lmin, lmax, lsum, flags_and = ringscan.split_gather(
        memoryview(avail), memoryview(desc), start, n, q, out_heads, out_descs)
    # the reference: what SplitRing.fetch_bulk computes with numpy
    ref_heads = np.array([heads[(start + i) % q] for i in range(n)], np.uint16)
    ref = np.frombuffer(desc, SPLIT_DESC_DTYPE, q)[ref_heads]
    assert bad == -1
    assert out_heads.tolist() == ref_heads.tolist()
    assert out_descs.tolist() == ref.tolist()
    if n:
        ends = [min(int(a) + int(ln), U64_MAX) for a, ln in zip(ref["addr"], ref["len"])]
        assert (flags_or, amin, emax) == (int(np.bitwise_or.reduce(ref["flags"])), int(ref["addr"].min()), max(ends))
        assert (lmin, lmax, lsum) == (int(ref["len"].min()), int(ref["len"].max()), int(ref["len"].sum(dtype=np.uint64)))
        assert flags_and == int(np.bitwise_and.reduce(ref["flags"]))


def test_a_head_out_of_range_is_found_before_any_descriptor_is_read() -> None:
    q = 8
    avail, desc = _rings(q, [1, 2, 3, 9, 4, 0xFFFF, 5, 6], [(0x1000 * i, 64, 0, 0) for i in range(q)])
    out_descs = np.zeros(8, SPLIT_DESC_DTYPE)
    heads = np.empty(8, np.uint16)
    r = ringscan.split_gather(memoryview(avail), memoryview(desc), 0, 8, q, heads, out_descs)
    assert r[0] == 3  # the first bad head's index in the batch
    assert heads.tolist() == [1, 2, 3, 9, 4, 0xFFFF, 5, 6]  # every head was read, as the numpy scan does
    assert not out_descs.tobytes().strip(b"\0")  # and no descriptor
    # the same ring from slot 6 wraps: heads 5, 6, 1, 2 are all good
    r = ringscan.split_gather(memoryview(avail), memoryview(desc), 6, 4, q, heads[:4], out_descs[:4])
    assert r[0] == -1 and heads[:4].tolist() == [5, 6, 1, 2]
    assert out_descs[:4]["addr"].tolist() == [0x5000, 0x6000, 0x1000, 0x2000]


@pytest.mark.parametrize("case", ["q not a power of two", "n > q", "start >= q", "avail short", "desc short",
                                  "heads short", "descs short", "negative start"])
def test_gather_refuses_what_does_not_fit(case: str) -> None:
    q, n, start = 16, 4, 0
    avail, desc = bytearray(6 + 2 * q), bytearray(16 * q)
    heads, descs = np.empty(n, np.uint16), np.empty(n, SPLIT_DESC_DTYPE)
    if case == "q not a power of two":
        q = 12
    elif case == "n > q":
        n = q + 1
    elif case == "start >= q":
        start = q
    elif case == "avail short":
        avail = bytearray(4 + 2 * q - 2)
    elif case == "desc short":
        desc = bytearray(16 * q - 1)
    elif case == "heads short":
        heads = np.empty(n - 1, np.uint16)
    elif case == "descs short":
        descs = np.empty(n - 1, SPLIT_DESC_DTYPE)
    else:
        start = -1
    with pytest.raises(ValueError):
        ringscan.split_gather(memoryview(avail), memoryview(desc), start, n, q, heads, descs)


@pytest.mark.parametrize("start", [0, 5, 14])
@pytest.mark.parametrize("same_length", [True, False])
def test_used_elements_land_where_the_numpy_path_puts_them(start: int, same_length: bool) -> None:
    q, n = 16, 6
    used = bytearray(6 + 8 * q)
    used[:] = b"\xAA" * len(used)
    ids = np.array([3, 1, 15, 0, 7, 9], np.uint16)
    written: int | np.ndarray = 1514 if same_length else np.arange(100, 100 + n, dtype=np.uint32)
    ringscan.split_used(memoryview(used), start, q, ids, written)
    ring = np.frombuffer(used, np.uint32, 2 * q, 4).reshape(q, 2)
    lens = [1514] * n if same_length else list(range(100, 100 + n))
    for i in range(n):
        assert ring[(start + i) % q].tolist() == [int(ids[i]), lens[i]]
    touched = {(start + i) % q for i in range(n)}
    assert all(ring[s].tolist() == [0xAAAAAAAA] * 2 for s in range(q) if s not in touched)
    assert used[:4] == b"\xAA" * 4 and used[-2:] == b"\xAA" * 2  # flags/idx and avail_event untouched


@pytest.mark.parametrize("case", ["used short", "lengths short", "length over u32", "n > q", "read-only ring"])
def test_used_refuses_what_does_not_fit(case: str) -> None:
    q = 8
    used: bytearray | bytes = bytearray(6 + 8 * q)
    ids = np.arange(4, dtype=np.uint16)
    written: int | np.ndarray = 60
    if case == "used short":
        used = bytearray(4 + 8 * q - 1)
    elif case == "lengths short":
        written = np.zeros(3, np.uint32)
    elif case == "length over u32":
        written = 1 << 32
    elif case == "n > q":
        ids = np.arange(q + 1, dtype=np.uint16)
    else:
        used = bytes(6 + 8 * q)
    with pytest.raises((ValueError, TypeError, BufferError)):
        ringscan.split_used(memoryview(used), 0, q, ids, written)


def test_fill_checks_every_buffer_before_writing_any() -> None:
    region = bytearray(4096)
    gpa = 0x10000
    addrs = np.array([gpa, gpa + 100, gpa + 4000], np.uint64)
    lens = np.array([64, 64, 96], np.uint32)
    ringscan.fill(memoryview(region), addrs, gpa, lens, b"A" * 50)
    assert region[:50] == b"A" * 50 and region[100:150] == b"A" * 50 and region[4000:4050] == b"A" * 50
    assert region.count(b"A") == 150
    for bad_addrs, bad_lens, data in [
        (np.array([gpa, gpa + 4090], np.uint64), np.array([64, 64], np.uint32), b"B" * 10),  # runs off the region
        (np.array([gpa, gpa - 16], np.uint64), np.array([64, 64], np.uint32), b"B" * 10),  # below the region
        (np.array([gpa, (1 << 64) - 8], np.uint64), np.array([64, 64], np.uint32), b"B" * 10),  # wraps
        (np.array([gpa, gpa + 200], np.uint64), np.array([64, 8], np.uint32), b"B" * 10),  # buffer too short
        (np.array([gpa, gpa + 200], np.uint64), np.array([64], np.uint32), b"B" * 10),  # lengths missing
    ]:
        with pytest.raises(ValueError):
            ringscan.fill(memoryview(region), bad_addrs, gpa, bad_lens, data)
        assert b"B" not in region


def test_packed_functions_refuse_what_does_not_fit() -> None:
    q = 8
    desc = bytearray(16 * q)
    out = np.empty(q + 1, np.uint16)
    fl = np.zeros(q, np.uint16)
    ok = {"slot": 1, "want": 0x80, "q": q, "limit": 4, "budget": q, "chunk": 2, "lists": 1, "count_lists": True}
    ringscan.packed_scan(memoryview(desc), *ok.values(), out)  # the reference call works
    for key, bad in [("slot", q), ("want", 0x81), ("budget", q + 1), ("budget", 0), ("chunk", 0), ("q", -1)]:
        args = {**ok, key: bad}
        with pytest.raises(ValueError):
            ringscan.packed_scan(memoryview(desc), *args.values(), out)
    with pytest.raises(ValueError):  # an output shorter than a ring's worth of flags
        ringscan.packed_scan(memoryview(desc), *ok.values(), np.empty(q, np.uint16))
    with pytest.raises(ValueError):  # a table shorter than the ring
        ringscan.packed_scan(memoryview(desc[:-1]), *ok.values(), out)
    with pytest.raises(ValueError):
        ringscan.packed_bodies(memoryview(desc), 7, 2, q, np.empty(1, SPLIT_DESC_DTYPE), fl)  # output too small
    with pytest.raises(ValueError):
        ringscan.packed_bodies(memoryview(desc), 0, q + 1, q, np.empty(q + 1, SPLIT_DESC_DTYPE), np.zeros(q + 1, np.uint16))
    with pytest.raises(ValueError):  # fewer flags than descriptors
        ringscan.packed_bodies(memoryview(desc), 0, 3, q, np.empty(3, SPLIT_DESC_DTYPE), fl[:2])
    recs = bytearray(16 * 3)
    with pytest.raises(ValueError):
        ringscan.packed_used(memoryview(desc), q, q, True, recs, 10)  # slot past the ring
    with pytest.raises(ValueError):
        ringscan.packed_used(memoryview(desc), 0, q, True, recs, np.zeros(2, np.uint32))  # a length short
    with pytest.raises(ValueError):
        ringscan.packed_used(memoryview(desc), 0, q, True, recs, 1 << 32)
    with pytest.raises(ValueError):  # not whole records
        ringscan.packed_used(memoryview(desc), 0, q, True, recs[:-1], 10)
    with pytest.raises(ValueError):  # no record
        ringscan.packed_used(memoryview(desc), 0, q, True, bytearray(), 10)


def test_packed_bodies_keep_the_flags_the_scan_read() -> None:
    # The descriptors are copied whole (wrapping at the ring end), then each
    # record's flags become the ones the flag scan read before: a driver
    # that rewrites a flags word between the two reads changes nothing.
    from pyvirtio.queue.bulk import PACKED_DESC_DTYPE
    q = 8
    table = np.zeros(q, PACKED_DESC_DTYPE)
    table["addr"] = np.arange(q) * 0x1000 + 0x10000
    table["len"] = np.arange(q) + 60
    table["id"] = np.arange(q)[::-1]
    table["flags"] = 0x8002  # rewritten: USED|WRITE where the scan saw AVAIL alone
    scanned = np.array([0x80, 0x82, 0x80], np.uint16)
    out = np.empty(3, PACKED_DESC_DTYPE)
    got = ringscan.packed_bodies(table.tobytes(), 6, 3, q, out, scanned)
    assert out["addr"].tolist() == [0x16000, 0x17000, 0x10000]  # slots 6, 7, then 0
    assert out["id"].tolist() == [1, 0, 7]
    assert out["flags"].tolist() == scanned.tolist()
    assert got == (0x10000, 0x17000 + 67, 60, 67, 66 + 67 + 60)


def test_packed_used_wraps_and_leaves_the_first_store_to_the_caller() -> None:
    q = 4
    desc = bytearray(16 * q)
    from pyvirtio.queue.bulk import PACKED_DESC_DTYPE
    recs = np.zeros(3, PACKED_DESC_DTYPE)  # the batch's records, as packed_bodies left them
    recs["addr"] = 0x1000
    recs["id"] = [5, 6, 7]
    recs["len"] = [64, 0, 64]
    recs["flags"] = [2, 2, 0]  # writable, writable but empty, read-only
    head = ringscan.packed_used(memoryview(desc), 3, q, True, recs.tobytes(), np.array([60, 0, 0], np.uint32))
    words = np.frombuffer(desc, np.uint64).reshape(q, 2)[:, 1].tolist()
    both, write = 0x8080, 0x2
    assert head == 60 | 5 << 32 | (both | write) << 48  # slot 3, this wrap: AVAIL|USED, WRITE
    assert words[3] == 0  # not stored: the caller stores it last
    assert words[0] == 0 | 6 << 32 | 0 << 48  # slot 0: the wrap flipped; empty buffer: no WRITE
    assert words[1] == 0 | 7 << 32 | 0 << 48  # read-only buffer: no WRITE


@st.composite
def iov_tables(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[int, int]]]:
    gpa = draw(st.sampled_from([0, 0x1000, 1 << 32, U64_MAX - 0x1FFFF]))  # the highest region ends 2^64 - 0xFFFF
    size = draw(st.sampled_from([0x1000, 0x10000]))
    host = draw(st.sampled_from([0x7F0000000000, 0x1000]))
    inside = st.tuples(st.integers(gpa, gpa + size), st.integers(0, 0x1000))
    anywhere = st.tuples(st.integers(0, U64_MAX), st.integers(0, (1 << 32) - 1))
    entries = draw(st.lists(st.one_of(inside, inside, inside, anywhere), min_size=1, max_size=300))
    nr = draw(st.integers(0, len(entries)))
    return gpa, size, host, nr, entries


@settings(max_examples=300, deadline=None)
@given(iov_tables())
def test_iov_table_gives_the_iovecs_only_for_buffers_inside_the_region(
        case: tuple[int, int, int, int, list[tuple[int, int]]]) -> None:
    gpa, size, host, nr, entries = case
    table = b"".join(a.to_bytes(8, "little") + n.to_bytes(4, "little") + b"\x01\x00\x07\x00" for a, n in entries)
    got = ringscan.iov_table(table, nr, gpa, size, host)
    if not all(gpa <= a and a + n <= gpa + size for a, n in entries):
        assert got is None  # one buffer outside (or wrapping past 2^64): no iovecs at all
        return
    iov, rlen, total = got
    assert iov == b"".join((host + a - gpa).to_bytes(8, "little") + n.to_bytes(8, "little") for a, n in entries)
    assert (rlen, total) == (sum(n for _, n in entries[:nr]), sum(n for _, n in entries))


@pytest.mark.parametrize("case", ["ragged table", "nr beyond the table", "negative nr", "region wraps"])
def test_iov_table_refuses_what_does_not_fit(case: str) -> None:
    table = bytes(16 * 4)
    args = {"ragged table": (table[:-1], 0, 0, 0x1000, 0x1000),
            "nr beyond the table": (table, 5, 0, 0x1000, 0x1000),
            "negative nr": (table, -1, 0, 0x1000, 0x1000),
            "region wraps": (table, 0, U64_MAX - 10, 0x1000, 0x1000)}[case]
    with pytest.raises(ValueError):
        ringscan.iov_table(*args)


def _batch(addrs: list[int], lens: list[int], flags: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array(addrs, np.uint64), np.array(lens, np.uint32), np.array(flags, np.uint16)


def test_gather_and_scatter_refuse_buffers_outside_the_region() -> None:
    region = bytearray(b"\xEE" * 256)
    gpa = 0x1000
    inside = (gpa + 16, 32)
    for bad in [(gpa - 1, 8), (gpa + 250, 8), (gpa + 256, 8), (U64_MAX - 3, 8)]:
        a, ln, _ = _batch([inside[0], bad[0]], [inside[1], bad[1]], [0, 0])
        with pytest.raises(ValueError):
            ringscan.gather(region, a, gpa, ln, np.zeros(2, np.uint16), 0, 1 << 32)
        a, ln, fl = _batch([inside[0], bad[0]], [inside[1], bad[1]], [2, 2])
        assert ringscan.scatter(region, a, gpa, ln, fl, [b"a" * 8, b"b" * 8], -1, b"") is None
        assert region == bytearray(b"\xEE" * 256)  # nothing written, not even the first frame


@pytest.mark.parametrize("case", ["lens short", "flags short", "frames short", "frame not bytes"])
def test_scatter_refuses_what_does_not_fit(case: str) -> None:
    region = bytearray(64)
    a, ln, fl = _batch([0, 32], [32, 32], [2, 2])
    frames: list = [b"x", b"y"]
    if case == "lens short":
        ln = ln[:1]
    elif case == "flags short":
        fl = fl[:1]
    elif case == "frames short":
        frames = frames[:1]
    else:
        frames = [b"x", "y"]
    with pytest.raises((ValueError, TypeError)):
        ringscan.scatter(region, a, 0, ln, fl, frames, -1, b"")
    assert region == bytearray(64)


def test_batch_columns_are_read_in_place_from_descriptor_records() -> None:
    """The fields of a numpy array of descriptor records (strided views, as
    the ring scan leaves them in a `Bulk`) give what contiguous copies give."""
    region = bytearray(range(256)) * 4
    gpa = 0x4000
    recs = np.zeros(3, SPLIT_DESC_DTYPE)
    recs["addr"] = [gpa + 8, gpa + 300, gpa + 700]
    recs["len"] = [16, 40, 24]
    recs["flags"] = [0, 2, 0]  # the middle buffer is device-writable
    cols = (recs["addr"], recs["len"], recs["flags"])
    assert not cols[0].flags.c_contiguous
    copies = tuple(np.ascontiguousarray(c) for c in cols)
    strided = ringscan.gather(bytes(region), cols[0], gpa, cols[1], cols[2], 0, 1 << 32)
    assert strided == ringscan.gather(bytes(region), copies[0], gpa, copies[1], copies[2], 0, 1 << 32)
    assert strided[0] == [bytes(region[8:24]), bytes(region[700:724])]
    recs["flags"] = 2
    a, b = bytearray(region), bytearray(region)
    frames = [b"x" * 10, b"y" * 12, b"z" * 14]
    got = ringscan.scatter(a, cols[0], gpa, cols[1], cols[2], frames, 2, b"\x01\x00")
    assert got == ringscan.scatter(b, copies[0], gpa, copies[1], np.full(3, 2, np.uint16), frames, 2, b"\x01\x00") == (10, 14, 36)
    assert a == b and a[700:714] == b"zz\x01\x00" + b"z" * 10
    ringscan.fill(a, cols[0], gpa, cols[1], b"F" * 16)
    ringscan.fill(b, copies[0], gpa, copies[1], b"F" * 16)
    assert a == b and a[300:316] == b"F" * 16


@pytest.mark.parametrize("bad", ["lens of u64", "two-dimensional addrs", "not a buffer"])
def test_a_batch_column_of_the_wrong_shape_is_refused(bad: str) -> None:
    region = bytearray(64)
    a, ln, fl = _batch([0, 32], [32, 32], [2, 2])
    if bad == "lens of u64":
        ln = ln.astype(np.uint64)
    elif bad == "two-dimensional addrs":
        a = a.reshape(1, 2)
    else:
        fl = [2, 2]  # type: ignore[assignment]
    with pytest.raises((ValueError, TypeError)):
        ringscan.scatter(region, a, 0, ln, fl, [b"x", b"y"], -1, b"")
    with pytest.raises((ValueError, TypeError)):
        ringscan.gather(bytes(region), a, 0, ln, fl, 0, 64)
    assert region == bytearray(64)


def test_arguments_of_the_wrong_kind_are_refused_and_no_buffer_stays_held() -> None:
    # The functions convert their arguments themselves (no argument tuple):
    # each wrong kind is an error, and buffers taken before the bad argument
    # are released again (a bytearray with a buffer still exported cannot
    # be resized).
    q = 8
    desc = bytearray(16 * q)
    out = bytearray(2 * (q + 1))
    ok = [desc, 1, 0x80, q, 4, q, 2, 1, True, out]
    assert ringscan.packed_scan(*ok)[0] >= 1  # the reference call works
    for i, bad in [(1, "1"), (1, 1.5), (2, None), (3, 1 << 70), (9, bytes(2 * (q + 1))),  # read-only output
                   (0, memoryview(bytes(32 * q))[::2]), (8, _Unbool())]:
        with pytest.raises((TypeError, OverflowError, BufferError, ValueError, RuntimeError)):
            ringscan.packed_scan(*ok[:i], bad, *ok[i + 1:])
    with pytest.raises(TypeError):
        ringscan.packed_scan(*ok[:-1])  # one too few
    with pytest.raises(TypeError):
        ringscan.packed_scan(*ok, 0)  # one too many
    with pytest.raises(TypeError):
        ringscan.iov_table(bytes(16), 1, 0, "4096", 0)  # u64 arguments are ints
    recs = bytearray(32)
    with pytest.raises(ValueError):  # lengths for three, records for two: both buffers were taken
        ringscan.packed_used(desc, 0, q, True, recs, np.zeros(3, np.uint32))
    desc.extend(b"x")  # no export left behind by the failed calls
    out.extend(b"x")
    recs.extend(b"x")
    assert ringscan.packed_bodies(bytes(16 * q), 0, 1, q, bytearray(16), bytes(2)) == (0, 0, 0, 0, 0)


class _Unbool:
    def __bool__(self) -> bool:
        raise RuntimeError("no truth value")


@st.composite
def forward_batches(draw: st.DrawFn) -> tuple[bytes, np.ndarray, np.ndarray, int, int, int]:
    """A source region and a batch of source and one of destination
    descriptor records over one 4 KiB region each: mostly a batch that can
    be forwarded, now and then (one draw in thirty) a buffer outside, the wrong way round, out of
    [lo, hi], too short for its frame, or asking for an offload."""
    from pyvirtio.queue.bulk import PACKED_DESC_DTYPE
    n = draw(st.integers(1, 6))
    region = bytearray(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(4096))
    lo, hi = draw(st.integers(0, 20)), draw(st.integers(100, 400))
    rare = st.integers(0, 29).map(lambda k: k == 0)  # one in thirty
    src, dst = np.zeros(n, SPLIT_DESC_DTYPE), np.zeros(n, PACKED_DESC_DTYPE)
    for i in range(n):
        ln = draw(st.integers(max(lo, 12), hi)) if not draw(rare) else draw(st.integers(0, 500))
        a = draw(st.integers(0, 4096 - ln)) if ln <= 4096 and not draw(rare) else draw(st.integers(0, 4200))
        if not draw(rare) and a + 2 <= 4096:
            region[a : a + 2] = b"\0\0"  # a header that asks for no offload
        src[i] = (0x10000 + a, ln, 2 if draw(rare) else 0, 0)
        room = ln + draw(st.integers(0, 64)) if not draw(rare) else draw(st.integers(0, 500))
        d = draw(st.integers(0, max(0, 4096 - room))) if not draw(rare) else draw(st.integers(0, 4200))
        dst[i] = (0x10000 + d, room, i, 0 if draw(rare) else 2)
    return bytes(region), src, dst, lo, hi, draw(st.sampled_from([-1, 0, 10]))


def _as_records(recs: np.ndarray, dtype: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
    out = np.zeros(len(recs), dtype)
    for f in ("addr", "len", "flags"):
        out[f] = recs[f]
    return out


@settings(max_examples=300, deadline=None)
@given(forward_batches(), st.booleans())
def test_forward_over_records_does_what_forward_over_columns_does(b, packed_source: bool) -> None:  # type: ignore[no-untyped-def]
    # `forward_records` (both batches as their descriptor records, flags at
    # 12 split or 14 packed) is `forward` over the same columns: the same
    # answer, the same bytes written, nothing written when refused.
    from pyvirtio.queue.bulk import PACKED_DESC_DTYPE
    region, src, dst, lo, hi, patch_at = b
    s_at, d_at = 12, 14
    if packed_source:  # the same batches in the other formats (fields by name)
        src, dst = _as_records(src, PACKED_DESC_DTYPE), _as_records(dst, SPLIT_DESC_DTYPE)
        s_at, d_at = 14, 12
    patch = b"\x01\x00" if patch_at >= 0 else b""
    src_mem = bytearray(region)
    by_cols, by_recs = bytearray(4096), bytearray(4096)
    want = ringscan.forward(src_mem, src["addr"], 0x10000, src["len"], src["flags"], by_cols, dst["addr"], 0x10000,
                            dst["len"], dst["flags"], lo, hi, patch_at, patch)
    got = ringscan.forward_records(src_mem, src.tobytes(), 0x10000, s_at, by_recs, dst.tobytes(), 0x10000, d_at,
                                   lo, hi, patch_at, patch)
    assert got == want and by_recs == by_cols
    if got is None:
        assert by_recs == bytearray(4096)


def test_forward_over_records_refuses_what_is_not_records() -> None:
    region, recs = bytearray(4096), bytes(32)
    for bad in [{"s_at": 13}, {"d_at": 0}, {"d": bytes(48)}, {"s": bytes(31), "d": bytes(31)}]:
        with pytest.raises(ValueError):
            ringscan.forward_records(region, bad.get("s", recs), 0, bad.get("s_at", 12), region, bad.get("d", recs), 0,
                                     bad.get("d_at", 14), 0, 100, -1, b"")
    with pytest.raises((TypeError, BufferError)):  # the destination region is written
        ringscan.forward_records(region, recs, 0, 12, bytes(4096), recs, 0, 14, 0, 100, -1, b"")


@settings(max_examples=200, deadline=None)
@given(forward_batches(), st.integers(0, 200), st.booleans())
def test_fill_over_records_does_what_fill_over_columns_does(b, k: int, packed: bool) -> None:  # type: ignore[no-untyped-def]
    # `fill_records` (the batch as its descriptor records: addr and len at
    # the same offsets in both layouts) is `fill` over the same columns:
    # the same bytes written, or the same refusal with nothing written.
    _, split_recs, packed_recs, *_ = b
    recs = packed_recs if packed else split_recs
    data = bytes((7 * i + 1) & 0xFF for i in range(k))
    by_cols, by_recs = bytearray(4096), bytearray(4096)

    def outcome(call) -> str:  # type: ignore[no-untyped-def]
        try:
            call()
        except ValueError:
            return "refused"
        return "filled"

    want = outcome(lambda: ringscan.fill(by_cols, recs["addr"], 0x10000, recs["len"], data))
    got = outcome(lambda: ringscan.fill_records(by_recs, recs.tobytes(), 0x10000, data))
    assert got == want and by_recs == by_cols
    if got == "refused":
        assert by_recs == bytearray(4096)
    with pytest.raises(ValueError):  # not whole records
        ringscan.fill_records(by_recs, recs.tobytes()[:-1], 0x10000, data)
