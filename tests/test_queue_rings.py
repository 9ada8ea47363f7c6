"""Split and packed rings against the virtio 1.2 rules, through the driver model."""

from __future__ import annotations

import struct

import pytest

from pyvirtio import spec
from pyvirtio.queue import ArmResult, InvalidSavedState, QueueState
from pyvirtio.testing import QueuePair

RINGS = ["split", "packed"]


def test_layout_sizes_and_offsets_follow_the_spec():
    assert spec.SPLIT_DESC.size == spec.PACKED_DESC.size == 16
    assert spec.avail_size(256) == 6 + 512
    assert spec.used_size(256) == 6 + 8 * 256
    assert spec.used_event_offset(256) == 4 + 512
    assert spec.avail_event_offset(256) == 4 + 8 * 256
    assert spec.USED_ELEM.size == 8 and spec.EVENT_SUPPRESS.size == 4
    assert (spec.PACKED_LEN, spec.PACKED_ID, spec.PACKED_FLAGS) == (8, 12, 14)
    assert int(spec.Feature.RING_PACKED) == 1 << 34 and int(spec.Feature.RING_EVENT_IDX) == 1 << 29


def test_vring_need_event_is_a_half_open_range_modulo_2_16():
    assert spec.vring_need_event(12, 14, 10) is True
    assert spec.vring_need_event(14, 14, 10) is False
    assert spec.vring_need_event(10, 14, 10) is True
    assert spec.vring_need_event(65535, 2, 65534) is True   # across the wrap
    assert spec.vring_need_event(2, 2, 65534) is False


@pytest.mark.parametrize("ring", RINGS)
def test_payload_reaches_the_device_and_written_bytes_reach_the_driver(ring):
    pair = QueuePair(ring, 8)
    out = pair.pool.alloc(5)
    inb = pair.pool.alloc(8)
    pair.raw.write(out, b"hello")
    pair.driver.add([(out, 5)], [(inb, 8)], token="t")
    pair.driver.publish()
    (chain,) = pair.vq.pop_batch()
    assert chain.read() == b"hello"
    assert chain.writable_len == 8
    assert chain.write(b"HELLO!") == 6
    pair.vq.complete(chain, 6)
    pair.vq.flush()
    assert pair.driver.get_used() == [("t", 6)]
    assert pair.raw.read(inb, 6) == b"HELLO!"


def test_split_indices_wrap_at_65535_without_losing_a_request():
    pair = QueuePair("split", 8, event_idx=True, start_index=65530)
    done = []
    for _ in range(6):
        pair.post(5)
        assert pair.serve() == 5
        done += pair.driver.get_used()
    assert len(done) == 30
    assert pair.vq.save().last_avail == (65530 + 30) & 0xFFFF


def test_packed_wrap_counters_toggle_after_exactly_q_slots():
    pair = QueuePair("packed", 5)
    pair.post(5)
    assert pair.serve() == 5
    st = pair.vq.save()
    assert (st.last_avail, st.avail_wrap, st.used_idx, st.used_wrap) == (0, False, 0, False)
    assert len(pair.driver.get_used()) == 5
    pair.post(3)
    assert pair.serve() == 3
    st = pair.vq.save()
    assert (st.last_avail, st.avail_wrap) == (3, False)
    assert len(pair.driver.get_used()) == 3


@pytest.mark.parametrize("ring", RINGS)
def test_multi_descriptor_and_indirect_chains_keep_segment_order(ring):
    pair = QueuePair(ring, 8, indirect=True)
    segs = []
    for i in range(3):
        g = pair.pool.alloc(4)
        pair.raw.write(g, bytes([65 + i]) * 4)
        segs.append((g, 4))
    w = pair.pool.alloc(16)
    pair.driver.add(segs, [(w, 16)], token="ind", indirect=True)
    pair.driver.add(segs, [(w, 16)], token="direct", indirect=False)
    pair.driver.publish()
    chains = pair.vq.pop_batch()
    assert [c.read() for c in chains] == [b"AAAABBBBCCCC"] * 2
    assert [c.writable_len for c in chains] == [16, 16]
    for c in chains:
        pair.vq.complete(c, 0)
    pair.vq.flush()
    assert [t for t, _ in pair.driver.get_used()] == ["ind", "direct"]


def test_split_direct_descriptors_followed_by_an_indirect_table_are_one_chain():
    # spec: "zero or more direct descriptors then one INDIRECT" must be handled
    pair = QueuePair("split", 8, indirect=True)
    head_buf = pair.pool.alloc(2)
    pair.raw.write(head_buf, b"hd")
    t1 = pair.pool.alloc(3)
    pair.raw.write(t1, b"abc")
    table = pair.pool.alloc(32)
    wbuf = pair.pool.alloc(8)
    pair.raw.write(table, spec.SPLIT_DESC.pack(t1, 3, spec.DescFlags.NEXT, 1)
                   + spec.SPLIT_DESC.pack(wbuf, 8, spec.DescFlags.WRITE, 0))
    d = pair.desc
    pair.raw.write(d, spec.SPLIT_DESC.pack(head_buf, 2, spec.DescFlags.NEXT, 1))
    pair.raw.write(d + 16, spec.SPLIT_DESC.pack(table, 32, spec.DescFlags.INDIRECT, 0))
    pair.raw.write(pair.driver_area + spec.AVAIL_RING, struct.pack("<H", 0))
    pair.raw.write(pair.driver_area + spec.AVAIL_IDX, struct.pack("<H", 1))
    (chain,) = pair.vq.pop_batch()
    assert chain.read() == b"hdabc" and chain.writable_len == 8


def test_no_interrupt_flag_is_honoured_without_event_idx():
    pair = QueuePair("split", 8, event_idx=False)
    pair.post(1)
    pair.serve()                      # first decision always notifies
    pair.driver.get_used()
    pair.driver.disable_interrupts()  # NO_INTERRUPT
    pair.post(2)
    chains = pair.vq.pop_batch()
    for c in chains:
        pair.vq.complete(c, 0)
    assert pair.vq.flush() is False
    assert pair.driver.enable_interrupts() is True  # used entries already there
    pair.driver.get_used()
    pair.post(1)
    (c,) = pair.vq.pop_batch()
    pair.vq.complete(c, 0)
    assert pair.vq.flush() is True


@pytest.mark.parametrize("ring", RINGS)
def test_event_idx_interrupt_fires_when_the_event_lies_inside_the_batch(ring):
    pair = QueuePair(ring, 64, event_idx=True)
    pair.post(1)
    pair.serve()
    pair.driver.get_used()
    pair.post(8)
    # Linux's delayed enable puts the event 3/4 into the outstanding buffers:
    # an equality test on the last element would miss it.
    assert pair.driver.enable_interrupts(delayed=True) is False
    chains = pair.vq.pop_batch()
    for c in chains:
        pair.vq.complete(c, 0)
    assert pair.vq.flush() is True
    pair.driver.get_used()
    pair.driver.disable_interrupts()
    pair.post(4)
    chains = pair.vq.pop_batch()
    for c in chains:
        pair.vq.complete(c, 0)
    assert pair.vq.flush() is False  # event not in the range, no interrupt


@pytest.mark.parametrize("ring", RINGS)
def test_kick_is_not_lost_when_driver_publishes_during_arming(ring):
    for event_idx in (False, True):
        pair = QueuePair(ring, 16, event_idx=event_idx)
        pair.post(2)
        pair.serve()
        pair.driver.get_used()
        assert pair.vq.pop_batch() == []
        # the driver publishes after the device's empty check but before it
        # armed: its kick decision may say "no kick" (suppressed)...
        pair.post(1)
        # ...so the device's arm must find the work in its re-check.
        assert pair.vq.arm() is ArmResult.WORK
        assert len(pair.vq.pop_batch()) == 1


@pytest.mark.parametrize("ring", RINGS)
def test_after_arming_the_next_publish_kicks(ring):
    for event_idx in (False, True):
        pair = QueuePair(ring, 16, event_idx=event_idx)
        for _ in range(3):
            pair.post(3)
            pair.serve()
            pair.driver.get_used()
            assert pair.vq.arm() is ArmResult.SLEEP
            gp = pair.pool.alloc(8)
            pair.driver.add([(gp, 8)], [], token="x")
            assert pair.driver.publish() is True
            # once the device found work while armed it suppresses; more
            # publishes no longer kick
            got = pair.vq.pop_batch()
            assert len(got) == 1
            pair.driver.add([(gp, 8)], [], token="y")
            assert pair.driver.publish() is False
            for c in got:
                pair.vq.complete(c, 0)
            pair.vq.flush()
            pair.serve()
            pair.driver.get_used()


@pytest.mark.parametrize("ring", RINGS)
def test_restore_hands_in_flight_chains_out_again_before_new_work(ring):
    pair = QueuePair(ring, 8)
    pair.post(4)
    chains = pair.vq.pop_batch()
    pair.vq.complete(chains[1], 0)
    pair.vq.flush()
    st = pair.vq.save()
    assert [cid for _, cid in st.in_flight] == [c.id for c in chains if c is not chains[1]]
    vq2 = pair.new_device(st)
    pair.post(1)
    again = vq2.pop_batch()
    assert len(again) == 3  # in-flight ones first, on their own
    again += vq2.pop_batch()
    assert [c.id for c in again[:3]] == [c.id for c in chains if c is not chains[1]]
    assert len(again) == 4
    for c in again:
        vq2.complete(c, 0)
    vq2.flush()
    assert sorted(t for t, _ in pair.driver.get_used()) == [0, 0, 1, 2, 3]


def test_restore_rejects_states_that_cannot_exist():
    bad = [
        QueueState(8, False, last_avail=10, used_idx=0, in_flight=()),   # 10 outstanding, none listed
        QueueState(8, False, last_avail=1, used_idx=0, in_flight=((0, 9),)),  # head >= size
        QueueState(8, True, last_avail=9, used_idx=0),                    # cursor beyond ring
        QueueState(6, False),                                             # split size not 2^n
    ]
    pair = QueuePair("split", 8)
    for st in bad:
        with pytest.raises(InvalidSavedState):
            st.validate()
    with pytest.raises(InvalidSavedState):
        pair.new_device(QueueState(16, False))  # wrong size for this ring


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_chains_given_back_at_a_stop_are_taken_again_with_an_exact_cursor(ring):
    """A ring stops while the device holds buffers it never wrote (net rx
    waiting for frames): handing them back moves the cursor to the spec's
    'next index to process', and a restarted queue takes exactly those
    buffers again, none lost and none repeated, even after out-of-order
    completions."""
    pair = QueuePair(ring, 8)
    pair.post(6, out=0, in_=64)
    chains = pair.vq.pop_batch()
    assert len(chains) == 6
    # complete 2 and 0 out of order, keep 1 (completed later), hold 3..5 untouched
    pair.vq.complete_batch([(chains[2], 8), (chains[0], 8)])
    pair.vq.complete_batch([(chains[1], 8)])
    assert pair.vq.give_back(chains[3:]) == 3
    assert pair.vq.in_flight == 0
    st = pair.vq.save()
    assert st.in_flight == ()
    assert st.last_avail == st.used_idx == 3
    again = pair.new_device(st).pop_batch()
    assert [c.id for c in again] == [c.id for c in chains[3:]]
    assert [c.pos for c in again] == [c.pos for c in chains[3:]]


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_chains_given_back_out_of_order_are_completed_empty(ring):
    pair = QueuePair(ring, 8)
    pair.post(4, out=0, in_=64)
    chains = pair.vq.pop_batch()
    pair.vq.complete_batch([(chains[3], 8)])
    assert pair.vq.give_back(chains[:3]) == 0  # not the last taken: returned to the driver empty
    got = pair.driver.get_used()
    assert sorted(t for t, _ in got) == [0, 1, 2, 3]
    assert sorted(n for _, n in got) == [0, 0, 0, 8]
    assert pair.vq.in_flight == 0
