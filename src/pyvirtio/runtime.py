"""The one queue loop: every device, `serve()` and `bench queue` run it.

A device says what to do with a batch of chains (a `Service`); the loop does
everything else, and it is the only code in pyvirtio that arms kicks or
sleeps::

    loop: completions from other threads in; device progress (frames from a
          source, I/O finished elsewhere)
          if the device takes chains now:
              pop a batch (read-only check; lazy suppression inside)
              found work -> device.handle(batch) -> publish -> again
              ring empty -> publish the burst, drain stale kicks, arm
                            (enable kicks, full fence, one re-check):
                            WORK -> again; SLEEP -> sleep on the kick
          otherwise: sleep on the device's own wake sources (never on the
                     kick: a device that takes no chains is not waiting for
                     the ring)

`QueueLoop.step()` is one pass of that loop and returns a named `Step`; the
thread (`run()`), the asyncio driver (`run_async()`), `bench queue` and the
model checker in the test suite all drive the same `step()`, so there is one
place where arming and sleeping are decided.

A device never sees the kick: it gets a `Queue` (the ring's engine `vq`,
counters, whether the ring is enabled, and `deliver`/`defer` for chains it
completes later from other threads) and returns a `Service`.

This module is compiled with the ring engine (setup.py ENGINE; pure Python
with PYVIRTIO_PURE=1). What devices subclass, `Service` and `VirtioDevice`,
lives in `pyvirtio.service`, plain Python either way, and is re-exported
here.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from pyvirtio.memory import mypyc_attr
from pyvirtio.queue import ArmResult, Chain, QueueError, Virtqueue
from pyvirtio.queue.bulk import Bulk
from pyvirtio.service import CallbackService, Completion, Service, VirtioDevice

log = logging.getLogger(__name__)

#: the `Service` methods the loop calls around a sleep
_SLEEP_HOOKS: Final = ("wake_fds", "wake_write_fds", "timer", "before_sleep", "after_sleep")


class Step(enum.Enum):
    """What one pass of the loop decided."""

    BUSY = "busy"        #: it did something, or must look again: call step() again
    SLEEP = "sleep"      #: nothing to do: block on `QueueLoop.sleep_fds()` (armed if it waits on the kick)
    STOPPED = "stopped"  #: stop() was asked and nothing is in flight any more

    def __bool__(self) -> bool:  # a named result, never a truth value
        raise TypeError("Step is a named result: compare it with `is`")


@dataclass(slots=True)
class QueueCounters:
    """What one queue index did since the process started (all connections).
    The loop and the device update these; readers see a consistent-enough
    snapshot under the GIL."""

    packets: int = 0       # frames / requests handled
    bytes: int = 0         # payload bytes (net: without the virtio-net header)
    dropped: int = 0       # frames dropped (no buffer, ring disabled, backend refused)
    kicks: int = 0         # wake-ups with a kick (eventfd reads that returned a count)
    kick_count: int = 0    # sum of the eventfd counters (front-end notifications)
    interrupts: int = 0    # used-buffer notifications sent
    sleeps: int = 0        # times the loop slept (armed or on the device's sources)
    sleep_us: int = 0      # time spent asleep, microseconds
    timeouts: int = 0      # sleeps that ended with nothing to do (run(stop=...)'s look at stop())
    errors: int = 0        # ring violations (QueueError) and device failures
    starts: int = 0        # times the ring was started

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@mypyc_attr(allow_interpreted_subclasses=True)
class Kick:
    """The driver's notifications: an eventfd (or a model of one in tests)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> int:
        """Consume pending kicks; return their count (0: none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0


@mypyc_attr(allow_interpreted_subclasses=True)
class Queue:
    """One started ring as a device sees it: the engine queue `vq`, its
    `index`, `counters`, whether the front-end `enabled` it, and the two calls
    for completing later: `defer()` when keeping a chain, `deliver(chain,
    written)` from any thread when done. `take_more(n)` pops more chains in
    the middle of a batch (net: buffers for one mergeable frame)."""

    __slots__ = ("_loop", "counters", "index", "name", "vq")

    def __init__(self, loop: QueueLoop) -> None:
        self._loop = loop
        self.vq = loop.vq
        self.index = loop.index
        self.name = loop.vq.name
        self.counters = loop.counters

    @property
    def enabled(self) -> bool:
        return self._loop.enabled

    @property
    def stopping(self) -> bool:
        return self._loop.stopping

    @property
    def outstanding(self) -> int:
        """Deferred chains not yet delivered."""
        return self._loop.outstanding

    def defer(self, n: int = 1) -> None:
        """`n` chains handed to `handle` will be completed later by `deliver`."""
        self._loop.outstanding += n

    def deliver(self, chain: Any, written: Any) -> None:
        """Complete a deferred chain (thread-safe); the loop publishes it."""
        self._loop.deliver(chain, written)

    def give_back(self, chains: Sequence[Chain]) -> None:
        """Chains taken but never written (call from `Service.stopped`): the
        ring takes them again after a restart (`Virtqueue.give_back`)."""
        self.vq.give_back(chains)

    def take_more(self, limit: int) -> list[Chain]:
        """Pop up to `limit` more chains now (read-only check; never arms)."""
        return self._loop.pop_more(limit)

    # A device whose rings hand work to each other on one thread (a
    # loopback: tx frames straight into rx buffers) may serve this ring from
    # another ring's service: while `quiet()`, `take_bulk` and `complete_now`.

    def quiet(self) -> bool:
        """May a service of another ring complete chains of this one now:
        this ring runs, enabled, in a `LoopGroup` whose thread is the
        caller, with nothing of its own waiting to be published (so the
        used ring keeps the order the chains were taken in)?"""
        lp = self._loop
        g = lp.group
        return (g is not None and g.ident == threading.get_ident() and lp.enabled and not lp.stopping
                and not lp._done and not lp._later and not lp.outstanding)

    def take_bulk(self, limit: int) -> Bulk | list[Chain] | None:
        """While `quiet()`: pop up to `limit` chains as `Virtqueue.pop_bulk`
        does (a broken ring is retired and reported as this ring's own, and
        gives []). None, having taken nothing, when the ring is not quiet."""
        if not self.quiet():
            return None
        try:
            return self.vq.pop_bulk(limit)
        except QueueError as e:
            self._loop.fail(e)
            return []

    def complete_now(self, bulk: Bulk, written: Any) -> None:
        """Complete `bulk` (taken with `take_bulk`) and publish it at once,
        signalling the driver if it asks. Only while `quiet()`."""
        lp = self._loop
        vq = lp.vq
        notify = vq.complete_bulk(bulk, written)
        if vq.flush() or notify:
            lp.signal()

    def receive_bulk(self, bulk: Bulk, held: Any, hdr: int, hi: int, patch_at: int = -1,
                     patch: bytes = b"") -> int:
        """While `quiet()`: the frames of `bulk` (another ring's batch of
        device-readable buffers, still in flight there) straight into this
        ring's next buffers, one frame per buffer, with `patch` over each
        copy at `patch_at` (`Bulk.forward_into`), published at once. The
        frames are `hdr` bytes of header and at most `hi` bytes in all.

        Returns the payload bytes moved (frame lengths less `hdr` each),
        counted with the frames on this ring's counters, when every frame
        went. Otherwise -1, with nothing written and nothing counted: the
        buffers taken here are appended to `held` (a list or deque of
        `Chain`s, ring order) for the caller to fill the usual way (this
        ring had fewer buffers than frames, or a frame the caller must look
        at); none are taken when the ring is not quiet. One engine call for
        a loopback's forwarding round, the device code around it stays
        out of the per-batch path."""
        n = bulk.n
        got = self.take_bulk(n)
        if type(got) is Bulk:
            done = bulk.forward_into(got, hdr, hi, patch_at, patch) if got.n == n else None
            if done is not None:
                shortest, longest, total = done
                moved = total - hdr * n
                c = self.counters
                c.packets += n
                c.bytes += moved
                self.complete_now(got, shortest if shortest == longest else bulk.lens)
                return moved
            held.extend(self.vq.unbulk(got))
        elif got:
            held.extend(got)
        return -1

    def wake(self) -> None:
        """Make the loop look at the device again (its state changed)."""
        self._loop.wake()

    def fail(self, exc: BaseException) -> None:
        """A device-detected guest error that breaks this ring."""
        self._loop.fail(exc)


@mypyc_attr(allow_interpreted_subclasses=True)
class QueueLoop:
    """Runs one `Virtqueue` for a device's `Service`.

    `kick`: the driver's notifications (a `Kick`, or None for polling mode:
    the front-end never kicks, the loop naps `POLL_NAP` when idle);
    `call`: sends a used-buffer notification; `on_fail(index, exc)`: the
    transport's hook when the guest broke the ring.
    """

    #: how long an idle polling-mode loop naps
    POLL_NAP = 0.0002
    #: how long `stop()` waits for the thread
    STOP_TIMEOUT = 10.0

    def __init__(self, vq: Virtqueue, kick: Kick | None, call: Callable[[], None], *,
                 index: int = 0, counters: QueueCounters | None = None,
                 on_fail: Callable[[int, BaseException], None] | None = None,
                 enabled: bool = True) -> None:
        self.vq = vq
        self.index = index
        self._kick = kick
        self._call = call
        self.counters = counters if counters is not None else QueueCounters()
        self._on_fail = on_fail
        self.enabled = enabled
        self.stopping = False
        self.outstanding = 0             # deferred chains not yet delivered
        self._later: deque[Completion] = deque()   # delivered from other threads
        self._done: list[Completion] = []          # completions not yet published
        self._sleeping = False
        self._armed = False              # the last SLEEP waits on the kick
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.service: Service | None = None
        self._progress = True  # call service.progress on every pass (see attach)
        self._hooks = True  # ask the service's sleep hooks (see attach)
        self.queue = Queue(self)
        self.thread: threading.Thread | None = None
        #: the `LoopGroup` whose thread runs this loop, if any (`start(group)`)
        self.group: LoopGroup | None = None
        self._left_group = threading.Event()  # set when the group thread let it go

    # -- what devices and the transport call ---------------------------------------------

    def attach(self, make: Callable[[Queue], Service]) -> Service:
        svc = self.service = make(self.queue)
        # a service without work of its own (the default `progress`) is not asked on every pass
        self._progress = getattr(type(svc), "progress", None) is not Service.progress
        # nor, at each sleep, one that keeps the defaults of all its sleep hooks
        self._hooks = any(getattr(type(svc), n, None) is not getattr(Service, n) for n in _SLEEP_HOOKS)
        return svc

    def start(self, group: LoopGroup | None = None) -> None:
        """Serve in a thread of its own, or in `group`'s thread beside the
        other loops of the group."""
        if group is not None:
            self.group = group
            group.add(self)
            return
        self.thread = threading.Thread(target=self._main, name=self.vq.name, daemon=True)
        self.thread.start()

    def wake(self) -> None:
        g = self.group
        if g is not None:
            g.poked = True  # a busy group thread looks at its sleepers on its next pass
        if self.wake_fd >= 0:
            try:
                os.eventfd_write(self.wake_fd, 1)
            except OSError:
                pass

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self.wake()

    def deliver(self, chain: Any, written: Any) -> None:
        self._later.append((chain, written))
        # Pairs with the loop's `_sleeping = True` then `_later` check (under
        # the GIL one of the two sides sees the other): no lost completion.
        if self._sleeping:
            self.wake()

    def pop_more(self, limit: int) -> list[Chain]:
        try:
            return self.vq.pop_batch(limit)
        except QueueError as e:
            self.fail(e)
            return []

    def fail(self, exc: BaseException) -> None:
        if self._on_fail is not None:
            self._on_fail(self.index, exc)
        else:
            self.counters.errors += 1

    def stop(self) -> None:
        """Stop the loop (chains in flight are finished and published first)
        and wait for its thread."""
        self.stopping = True
        self.wake()
        g = self.group
        if g is not None:
            if g.thread is not threading.current_thread() and not self._left_group.wait(self.STOP_TIMEOUT):
                log.error("%s: queue loop did not stop within %gs; abandoning it", self.vq.name,
                          self.STOP_TIMEOUT)
                return
            g.wait_if_idle()
            self.close()
            return
        t = self.thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(self.STOP_TIMEOUT)
            if t.is_alive():  # a device bug: do not hang the control socket forever
                log.error("%s: queue loop did not stop within %gs; abandoning it", self.vq.name,
                          self.STOP_TIMEOUT)
                return
        self.close()

    def close(self) -> None:
        if self.wake_fd >= 0:
            try:
                os.close(self.wake_fd)
            except OSError:
                pass
            self.wake_fd = -1

    # -- the loop ----------------------------------------------------------------------------

    def step(self) -> Step:
        """One pass of the loop (see the module docstring)."""
        # Hot path: written for speed (locals, one pop and one publication
        # per batch).
        svc = self.service
        assert svc is not None, "attach() a service first"
        done = self._done
        later = self._later
        if later:
            n = len(later)
            for _ in range(n):
                done.append(later.popleft())
            self.outstanding -= n
        progressed = svc.progress(done) if self._progress else False
        if self.stopping:
            if done:
                self.publish()
            if self.outstanding > 0:
                return self._sleep_unarmed(svc)
            return Step.STOPPED
        want = svc.take()
        if want <= 0:
            if done:
                self.publish()
            if progressed:
                return Step.BUSY
            return self._sleep_unarmed(svc)
        vq = self.vq
        try:
            chains = vq.pop_bulk(want) if svc.bulk else vq.pop_batch(want)
        except QueueError as e:  # logged by the queue, which is now retired
            self.fail(e)
            chains = []
        if len(chains):
            svc.handle(chains, done)
            if len(done) >= svc.publish_at:
                self.publish()
            return Step.BUSY
        # The ring is empty: the burst is over, its completions go out together.
        if done:
            self.publish()
        if progressed or later:
            return Step.BUSY
        # The sleep boundary. Kicks that came while we worked are stale:
        # drain them before arming; any kick after this point stays readable.
        kick = self._kick
        if kick is not None:
            n = kick.drain()
            if n:
                c = self.counters
                c.kicks += 1
                c.kick_count += n
        if vq.arm() is ArmResult.WORK:
            return Step.BUSY
        if self._hooks and svc.before_sleep():
            return Step.BUSY
        self._armed = True
        return self._announce_sleep()

    def _sleep_unarmed(self, svc: Service) -> Step:
        if self._hooks and svc.before_sleep():
            return Step.BUSY
        self._armed = False
        return self._announce_sleep()

    def _announce_sleep(self) -> Step:
        self._sleeping = True
        if self._later:  # a completion delivered just before we announced
            self._sleeping = False
            return Step.BUSY
        return Step.SLEEP

    def sleep_fds(self) -> list[int]:
        """What the SLEEP just returned waits on: the kick when armed, the
        loop's wake fd, the device's own wake sources."""
        fds = [self.wake_fd]
        if self._armed and self._kick is not None:
            fds.append(self._kick.fileno())
        svc = self.service
        if svc is not None and self._hooks:
            fds.extend(svc.wake_fds())
        return fds

    def sleep_write_fds(self) -> Sequence[int]:
        """What the SLEEP just returned also waits on for writability: the
        device's `Service.wake_write_fds()`."""
        svc = self.service
        return svc.wake_write_fds() if svc is not None and self._hooks else ()

    def sleep_timeout(self) -> float | None:
        """None: sleep until woken. Polling mode naps instead of waiting for
        a kick; a device timer bounds the sleep too."""
        t = self.POLL_NAP if self._armed and self._kick is None else None
        svc = self.service
        if svc is not None and self._hooks:
            d = svc.timer()
            if d is not None and (t is None or d < t):
                t = max(d, 0.0)
        return t

    def woke(self, ready: Sequence[int] | None = None) -> None:
        """Call after the sleep `step()` asked for ended (`ready`: the fds
        that were readable, when known)."""
        self._sleeping = False
        if ready is None or self.wake_fd in ready:
            try:
                os.eventfd_read(self.wake_fd)
            except (BlockingIOError, OSError):
                pass
        svc = self.service
        if svc is not None and self._hooks:
            svc.after_sleep()

    def publish(self) -> None:
        """Publish every completion gathered, as one batch (the eager
        baseline: one publication and one decision per completion)."""
        done = self._done
        vq = self.vq
        call = self.signal
        if vq.eager and self.service is not None and self.service.eager_each:
            for obj, written in done:
                if type(obj) is Bulk:
                    notify = vq.complete_bulk(obj, written)
                else:
                    notify = vq.complete(obj, written)
                if notify:
                    call()
            if vq.flush():
                call()
            done.clear()
            return
        chains: list[tuple[Chain, int]] = []
        notify = False
        for item in done:
            if type(item[0]) is Bulk:
                if chains:  # the chains completed before it go first: the used ring keeps their order
                    notify = vq.complete_batch(chains) or notify
                    chains = []
                notify = vq.complete_bulk(item[0], item[1]) or notify
            else:
                chains.append(item)
        done.clear()
        if vq.complete_batch(chains) or notify:
            call()

    def signal(self) -> None:
        self._call()
        self.counters.interrupts += 1

    # -- drivers of step() ----------------------------------------------------------------

    def run(self, stop: Callable[[], bool] | None = None, stop_poll: float = 0.5) -> None:
        """Serve in this thread until `stop()` (looked at every pass, and
        every `stop_poll` seconds asleep) or `self.stop()`."""
        step = self.step
        c = self.counters
        poller = select.poll()
        registered: list[int] = []
        registered_w: list[int] = []
        while True:
            if stop is not None and stop() and not self.stopping:
                self.stopping = True
            s = step()
            if s is Step.BUSY:
                continue
            if s is Step.STOPPED:
                break
            reads = self.sleep_fds()
            writes = list(self.sleep_write_fds())
            if reads != registered or writes or registered_w:  # usually the same set: keep the poll object
                poller = select.poll()
                for fd in reads:
                    poller.register(fd, select.POLLIN)
                for fd in writes:  # POLLIN too if it is also a read fd
                    poller.register(fd, select.POLLOUT | (select.POLLIN if fd in reads else 0))
                registered = reads
                registered_w = writes
            timeout = self.sleep_timeout()
            if timeout is None and stop is not None:
                timeout = stop_poll  # look at stop() now and then
            c.sleeps += 1
            t = time.perf_counter_ns()
            events = poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
            if not events:
                c.timeouts += 1
            c.sleep_us += (time.perf_counter_ns() - t) // 1000
            self.woke([fd for fd, _ in events])
        svc = self.service
        if svc is not None:
            svc.stopped()

    def _main(self) -> None:
        try:
            _profiled(self.vq.name, self, self.run)
        except QueueError as e:
            self.fail(e)
        except Exception as e:  # a device bug or a host I/O failure: retire this ring only
            log.exception("%s: queue loop failed", self.vq.name)
            self.fail(e)

    async def run_async(self) -> None:
        """`run()` for asyncio: the same steps, sleeping with the event loop."""
        loop = asyncio.get_running_loop()
        c = self.counters
        while True:
            s = self.step()
            if s is Step.BUSY:
                await asyncio.sleep(0)  # bounded work per pass: let others run
                continue
            if s is Step.STOPPED:
                break
            woke = asyncio.Event()
            fds = self.sleep_fds()
            for fd in fds:
                loop.add_reader(fd, woke.set)
            wfds = list(self.sleep_write_fds())
            for fd in wfds:
                loop.add_writer(fd, woke.set)
            c.sleeps += 1
            try:
                timeout = self.sleep_timeout()
                if timeout is None:
                    await woke.wait()
                else:
                    try:
                        await asyncio.wait_for(woke.wait(), timeout)
                    except TimeoutError:
                        pass
            finally:
                for fd in fds:
                    loop.remove_reader(fd)
                for fd in wfds:
                    loop.remove_writer(fd)
            self.woke()
        if self.service is not None:
            self.service.stopped()


def _profiled(name: str, owner: object, run: Callable[[], None]) -> None:
    """`run()`, under cProfile when PYVIRTIO_PROFILE_DIR names a directory
    (a developer aid: one dump per loop thread)."""
    prof_dir = os.environ.get("PYVIRTIO_PROFILE_DIR")
    if not prof_dir:
        run()
        return
    import cProfile
    prof = cProfile.Profile()
    try:
        prof.runcall(run)
    finally:
        prof.dump_stats(os.path.join(prof_dir, f"{name}.{os.getpid()}.{id(owner):x}.prof"))


@mypyc_attr(allow_interpreted_subclasses=True)
class LoopGroup:
    """One thread serving several `QueueLoop`s: rings that hand work to each
    other (a loopback's tx and rx) without a thread wake-up between them.

    Every loop's `step()` runs in turn; a loop that asks to sleep is set
    aside until one of its sleep fds is ready or its timeout passes. While
    another loop is busy, the sleepers' fds are looked at with a
    zero-timeout poll at most every `BUSY_POLL_NS` (at once after a
    `QueueLoop.wake()` of any of them); the thread blocks only when every
    loop sleeps, on all their fds at once.
    Arming stays each loop's own decision, in its `step()`. Loops join with
    `QueueLoop.start(group)` and leave with `QueueLoop.stop()`, each on its
    own; the thread ends with its last loop and starts again with the next.
    A loop that fails is retired alone.
    """

    #: while a loop is busy, how often the sleeping loops' fds are polled
    #: (a syscall; a busy pass is a few microseconds)
    BUSY_POLL_NS = 50_000

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loops: list[QueueLoop] = []
        self._gen = 0  # bumped under the lock whenever `_loops` changes
        #: set by `QueueLoop.wake()` of a member: poll the sleepers on the next pass
        self.poked = False
        #: the serving thread's `threading.get_ident()` while it serves
        self.ident: int | None = None
        self._wake = -1  # the thread's own wake-up fd: it lives as long as the thread
        self._closed = False
        self.thread: threading.Thread | None = None

    def add(self, loop: QueueLoop) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: the group is closed")
            self._loops.append(loop)
            self._gen += 1
            if self.thread is None:
                self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self.thread.start()
            else:
                os.eventfd_write(self._wake, 1)

    def wait_if_idle(self, timeout: float = 1.0) -> None:
        """When no loop is left, wait for the thread to end (it closes its
        fd on the way out: nothing of the group outlives its last loop)."""
        with self._lock:
            t = self.thread if not self._loops else None
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def close(self) -> None:
        """No loop may join any more (the device is closing)."""
        with self._lock:
            self._closed = True

    def _leave(self, loop: QueueLoop) -> None:
        with self._lock:
            self._loops.remove(loop)
            self._gen += 1
        loop._left_group.set()

    def _main(self) -> None:
        self.ident = threading.get_ident()
        _profiled(self.name, self, self._serve)

    def _serve(self) -> None:
        # loop -> (fds it sleeps on, write fds, wake-up deadline or None, when it fell asleep)
        asleep: dict[QueueLoop, tuple[list[int], Sequence[int], float | None, int]] = {}
        now = time.perf_counter_ns
        # The poll set changes only when a loop falls asleep or wakes: kept
        # between passes, and while a loop is busy polled with zero timeout
        # at most every BUSY_POLL_NS (or at once when `poked`).
        poller = select.poll()
        deadline: float | None = None
        stale = True
        seen = -1
        loops: list[QueueLoop] = []
        last_poll = 0
        interval = self.BUSY_POLL_NS
        while True:
            if self._gen != seen:  # the member list changed (it changes only under the lock)
                with self._lock:
                    loops = list(self._loops)
                    seen = self._gen
                    if not loops:
                        os.close(self._wake)
                        self._wake = -1
                        self.thread = None
                        self.ident = None
                        return
            busy = False
            for lp in loops:
                if lp in asleep:
                    continue
                try:
                    s = lp.step()
                except QueueError as e:
                    lp.fail(e)
                    self._leave(lp)
                    continue
                except Exception as e:  # a device bug: retire this ring only
                    log.exception("%s: queue loop failed", lp.vq.name)
                    lp.fail(e)
                    self._leave(lp)
                    continue
                if s is Step.BUSY:
                    busy = True
                elif s is Step.STOPPED:
                    if lp.service is not None:
                        lp.service.stopped()
                    self._leave(lp)
                else:
                    t = lp.sleep_timeout()
                    lp.counters.sleeps += 1
                    asleep[lp] = (lp.sleep_fds(), list(lp.sleep_write_fds()),
                                  None if t is None else time.monotonic() + t, now())
                    stale = True
            if not busy and not asleep:
                continue  # every loop left during this pass: look again (the thread ends with the last)
            if busy:
                if not self.poked and now() - last_poll < interval:
                    continue  # the sleepers were looked at a moment ago
                self.poked = False
                last_poll = now()
            if stale:
                poller = select.poll()
                poller.register(self._wake, select.POLLIN)
                deadline = None
                for fds, wfds, dl, _ in asleep.values():
                    for fd in fds:
                        poller.register(fd, select.POLLIN | (select.POLLOUT if fd in wfds else 0))
                    for fd in wfds:
                        if fd not in fds:
                            poller.register(fd, select.POLLOUT)
                    if dl is not None and (deadline is None or dl < deadline):
                        deadline = dl
                stale = False
            if busy:
                timeout = 0
            elif deadline is None:
                timeout = -1
            else:
                timeout = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            events = poller.poll(timeout)
            if not events and deadline is None:
                continue  # nothing woke and no sleep can have timed out
            ready = {fd for fd, _ in events}
            if self._wake in ready:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            mono = time.monotonic()
            for lp, (fds, wfds, dl, t0) in list(asleep.items()):
                hit = [fd for fd in (*fds, *wfds) if fd in ready]
                if hit or (dl is not None and mono >= dl):
                    del asleep[lp]
                    stale = True
                    c = lp.counters
                    c.sleep_us += (now() - t0) // 1000
                    if not hit:
                        c.timeouts += 1
                    lp.woke(hit)


def settle_heap() -> None:
    """Call once in a serving process, when start-up is over and before any
    guest memory is mapped: every object alive now (modules, numpy, the
    device) leaves the cyclic garbage collector's view (`gc.freeze`), and
    young collections run every 10,000 allocations instead of 700. Each
    request allocates a few short-lived containers; with the defaults the
    collector runs every few requests and now and then walks the whole
    start-up heap. Cycles that hold guest memory are still collected
    (`Backend` also collects explicitly when it unmaps)."""
    gc.freeze()
    gc.set_threshold(10000, 50, 100)


def eventfd_call(fd: int) -> Callable[[], None]:
    """A `call` for `QueueLoop` writing one eventfd."""
    def call() -> None:
        os.eventfd_write(fd, 1)
    return call


__all__ = ["CallbackService", "Completion", "Kick", "LoopGroup", "Queue", "QueueCounters", "QueueLoop", "Service", "Step",
           "VirtioDevice",
           "eventfd_call", "settle_heap"]
