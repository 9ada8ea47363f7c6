"""The notification protocol, model-checked (tests/modelcheck.py).

The real `QueueLoop` over a `Virtqueue` and the real driver rings run as two
threads; every guest-memory load, store flush and fence, every kick and
interrupt is a scheduling point; stores sit in per-thread store buffers
until a fence or the scheduler flushes them. Every interleaving within two
preemptions is explored for each ring format, with EVENT_IDX on and off, and
for three driver behaviours (interrupts on, NAPI-style off-while-reaping,
polling with interrupts off for good), and once more from just before the
indices wrap. The mutants show the checker is not vacuous: each breaks one
step of the protocol and must be caught with a printed interleaving that
replays. Deeper: `python tests/modelcheck.py` (see its docstring).
"""

from __future__ import annotations

import pytest

import modelcheck as mc

#: the default bound: every interleaving with at most this many preemptions
PREEMPTIONS = 2
#: an exhaustive search at the default bound visits well over this many
#: interleavings and shared states per configuration (the smallest has ~320
#: and ~1100): far from a search that stopped early or never branched
MIN_INTERLEAVINGS = 250
MIN_STATES = 900

CONFIGS = [pytest.param(ring, ev, mode, id=f"{ring}-event_idx_{'on' if ev else 'off'}-{mode}")
           for ring in mc.RINGS for ev in (False, True) for mode in mc.MODES]
RING_EV = [pytest.param(ring, ev, id=f"{ring}-event_idx_{'on' if ev else 'off'}")
           for ring in mc.RINGS for ev in (False, True)]

#: the mutant replaces a method of an engine class: compiled callers of a
#: native class (the compiled loop calling `Virtqueue.arm`, the queue its
#: ring's `publish`) never see the replacement, so these run on the pure engine
PURE_ENGINE = pytest.mark.pure_engine

RECHECK_HIT = "device's re-check after arming found work"
KICK_RACE = "a skipped kick and a device re-check hit"
DRIVER_RECHECK_HIT = "driver's re-check after enabling interrupts found a completion"
INTERRUPT_RACE = "a skipped interrupt and a driver re-check hit"
INTERRUPT_SKIPPED = "device skipped an interrupt (driver asked for none)"


@pytest.mark.parametrize(("ring", "event_idx", "mode"), CONFIGS)
def test_real_loop_loses_no_kick_no_interrupt_and_completes_each_buffer_once(ring, event_idx, mode):
    _check_real(mc.Config(ring=ring, event_idx=event_idx, mode=mode, preemptions=PREEMPTIONS))


@pytest.mark.parametrize(("ring", "event_idx"), RING_EV)
def test_real_loop_keeps_the_protocol_across_the_index_wrap(ring, event_idx):
    # split: avail/used indices go 65535 -> 0; packed: the wrap counters flip
    _check_real(mc.Config(ring=ring, event_idx=event_idx, mode="napi", preemptions=PREEMPTIONS, wrap=True))


def _check_real(cfg: mc.Config) -> None:
    event_idx, mode = cfg.event_idx, cfg.mode
    r = mc.explore(cfg)
    print(r.row())
    assert r.violation is None, r.report()
    assert r.complete
    assert r.executions >= MIN_INTERLEAVINGS
    assert r.states >= MIN_STATES
    # the exploration reached the races the protocol exists for, and the
    # real code survived them
    cov = r.coverage
    assert cov.get(RECHECK_HIT, 0) > 0, cov
    if event_idx:
        assert cov.get(KICK_RACE, 0) > 0, cov
    if mode != "poll":
        assert cov.get(DRIVER_RECHECK_HIT, 0) > 0, cov
    if mode != "intr":
        assert cov.get(INTERRUPT_SKIPPED, 0) > 0, cov
    if mode == "napi":
        assert cov.get(INTERRUPT_RACE, 0) > 0, cov


def _counterexample(mutant: str, ring: str, event_idx: bool, mode: str = "intr",
                    preemptions: int = PREEMPTIONS, deepen: bool = True) -> mc.Result:
    """The mutant's first counterexample; `deepen`: searched with 0, 1, ...
    preemptions, so that it is one of the shortest."""
    cfg = mc.Config(ring=ring, event_idx=event_idx, mode=mode, preemptions=preemptions, mutant=mutant)
    r = mc.find_counterexample(cfg) if deepen else mc.explore(cfg, count_states=False)
    print(r.report())
    assert r.violation is not None, f"mutant {mutant} survived {r.executions} interleavings"
    # the interleaving is a real schedule: it replays to the same violation
    again = mc.replay(cfg, r.schedule)
    assert again.violation is not None and again.violation.kind == r.violation.kind
    return r


@PURE_ENGINE
@pytest.mark.parametrize(("ring", "event_idx"), RING_EV)
def test_arming_without_the_full_fence_loses_a_kick(ring, event_idx):
    r = _counterexample("no-fence-after-arm", ring, event_idx)
    assert r.violation.kind == "lost-kick"
    # the driver read the suppression state while the device's enable was
    # still in the device's store buffer
    assert "sleep (armed)" in r.trace and "store (buffered)" in r.trace


@PURE_ENGINE
@pytest.mark.parametrize(("ring", "event_idx"), RING_EV)
def test_arming_without_the_recheck_loses_a_kick(ring, event_idx):
    r = _counterexample("no-recheck-after-arm", ring, event_idx)
    assert r.violation.kind == "lost-kick"
    assert r.found_at == 1  # one preemption between the empty check and the arm suffices


@PURE_ENGINE
@pytest.mark.parametrize(("ring", "event_idx"), RING_EV)
def test_publishing_used_before_its_element_completes_a_buffer_wrongly(ring, event_idx):
    r = _counterexample("used-before-element", ring, event_idx)
    assert r.violation.kind == "exactly-once"


@PURE_ENGINE
def test_polling_driver_sees_a_used_index_published_before_its_element():
    r = _counterexample("used-before-element", "split", False, mode="poll")
    assert r.violation.kind == "exactly-once"


# The lost-interrupt check is live too: break either side of the interrupt
# handshake and it fires.

@pytest.mark.parametrize(("ring", "event_idx"), RING_EV)
def test_driver_sleeping_without_its_recheck_loses_an_interrupt(ring, event_idx):
    r = _counterexample("driver-sleeps-without-recheck", ring, event_idx, mode="napi")
    assert r.violation.kind == "lost-interrupt"
    assert "wait for interrupt" in r.trace


@PURE_ENGINE
@pytest.mark.parametrize("ring", mc.RINGS)
def test_device_deciding_the_interrupt_without_its_fence_loses_an_interrupt(ring):
    # needs three preemptions (the device's first publication always
    # interrupts), which no bound below finds: search at 3 directly
    r = _counterexample("no-fence-before-interrupt-decision", ring, True, mode="napi", preemptions=3,
                        deepen=False)
    assert r.violation.kind == "lost-interrupt"


X, Y = 0, 1


def test_store_buffer_model_lets_a_load_pass_an_earlier_store_unless_fenced():
    # store buffering (Dekker): both loads may miss the other side's store
    # under TSO, which is why the arm and the publish each need a full fence
    sb = [[("st", X, 1), ("ld", Y)], [("st", Y, 1), ("ld", X)]]
    assert (0, 0) in mc.litmus(sb)
    fenced = [[("st", X, 1), ("fence",), ("ld", Y)], [("st", Y, 1), ("fence",), ("ld", X)]]
    assert mc.litmus(fenced) == {(0, 1), (1, 0), (1, 1)}


def test_threads_that_block_each_other_are_reported_as_a_deadlock():
    class WaitForEachOther(mc.Machine):
        def __init__(self, prefix, expect):
            super().__init__(memoryview(bytearray(4)), ["A", "B"], prefix, expect, None, 100)

        def run(self):
            a, b = self.threads
            super().run([lambda: self.wait(a, "wait for B", lambda: b.done),
                         lambda: self.wait(b, "wait for A", lambda: a.done)])

    runs = list(mc.executions(WaitForEachOther, 2))
    assert len(runs) == 2  # A first, B first
    assert all(x.violation is not None and x.violation.kind == "deadlock" for x in runs)


def test_store_buffer_model_keeps_stores_in_order_and_forwards_a_threads_own_stores():
    # message passing: TSO never shows the flag without the data before it
    mp = [[("st", X, 1), ("st", Y, 1)], [("ld", Y), ("ld", X)]]
    assert mc.litmus(mp) == {(0, 0), (0, 1), (1, 1)}
    own = [[("st", X, 1), ("ld", X)], [("st", X, 2), ("ld", X)]]
    assert mc.litmus(own) == {(1, 2)}
