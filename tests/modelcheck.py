"""A stateless model checker for the notification protocol (issue 13).

It runs the real device loop (`pyvirtio.runtime.QueueLoop` over a
`pyvirtio.queue.Virtqueue`) and the real driver model (`pyvirtio.driver`
`SplitDriver` / `PackedDriver`) as two threads, and explores their
interleavings the way loom and CHESS do: every execution starts from scratch,
each choice the scheduler made is recorded, and the next execution replays a
prefix of those choices and takes a different branch at the deepest point
that still has one (depth-first over the choice points). Nothing is cached
between executions, so the code under test needs no hooks: it only has to be
deterministic for a given schedule, which the checker verifies on replay.

Scheduling points
    Every guest-memory access goes through `ModelMemory`/`ModelArea` (the
    `GuestMemory`/`Area` interface the engine and the driver use; see
    `pyvirtio.memory.CountingMemory` for the same surface). A thread parks at
    each access another thread could observe or be affected by: a load that
    its own store buffer does not fully satisfy, a fence whose buffer is not
    empty, a kick (driver), an interrupt (device), draining the kick counter
    (device), and blocking waits. A store only enters the thread's own store
    buffer, which nobody else can see, so it needs no scheduling point of its
    own: the *flush* of that store to memory is the observable event, and it
    is a separate choice the scheduler explores.

Memory model (x86-TSO-like store buffers)
    Each thread has a FIFO store buffer. Its stores are appended there; its
    loads read memory overlaid with its own buffer (store forwarding); a
    full fence waits until its buffer has drained; moving the oldest
    buffered store of any thread to memory is an action the scheduler may
    take at any scheduling point. A bulk read or write of the engine (one
    `Area` call: a slice of used elements, a descriptor, a run of avail
    entries) is one atomic access; 2/4/8-byte fields never tear. The kick
    and interrupt counters are eventfds: sequentially consistent, outside
    the buffers, and writing one is a release (the writer's buffer drains
    first), as the kernel's locks make it. `pyvirtio.fence.acquire/release`
    are not modelled: on x86 (`WEAK_ORDERING` False) nothing calls them.
    The litmus tests in tests/test_model_check.py pin the model down (store
    buffering allowed without fences, forbidden with them; message passing
    keeps store order).

Preemption bound
    At each point the running thread has a default action: run its next
    operation, or, when it waits for its own buffer to drain (a fence, a
    kick, an interrupt), flush its oldest store. Any other choice (switching
    to the other thread, flushing a store early) while the running thread
    could go on costs one preemption; choices made while it is blocked or
    finished are free. Executions are explored up to a bound on preemptions
    (2 in the unit suite, 3 in the deep run).

The scenario
    Device thread: `loop.step()` until it returns `Step.SLEEP`, then block
    on what `loop.sleep_fds()` names (the kick counter, only when the loop
    armed), then `loop.woke()`. The service is a `CallbackService` with
    `bulk=False`: the numpy bulk path reads guest memory through arrays the
    model cannot intercept. Driver thread: post K device-writable buffers,
    one per `publish()`, kicking when it says so; then reap with
    `get_used()`; when nothing is there, enable interrupts (with its
    re-check) and wait for one, or, when polling, wait until memory shows a
    completion (a spin loop is modelled as that wait). No indirect
    descriptors, no payload: the protocol is in the ring metadata.

Properties checked at every step
    lost kick: the device sleeps, no kick is pending, the driver is not
    between its publish and its kick, and memory shows a buffer the device
    has not taken; lost interrupt: the driver waits for an interrupt it
    asked for, none is pending, the device is not between its publish and
    its interrupt, and memory shows a completion the driver has not reaped;
    exactly once: every buffer comes back once, with the length the device
    reported (a stale used element shows up as a wrong id or length);
    deadlock: nothing can move and the driver is not done (classified with
    the two above when they apply); a ring error the device or the driver
    detects; an execution longer than `max_steps` (livelock).

Run deeper from the command line (a table; exit status 1 if the real code
has a counterexample or a mutant survives)::

    PYTHONPATH=src python tests/modelcheck.py --preemptions 3 --buffers 3 --wrap both
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from pyvirtio import spec
from pyvirtio.driver import BufferPool, DeviceProtocolError, PackedDriver, SplitDriver, ring_layout
from pyvirtio.memory import Area, AreaKind, GuestMemory, GuestMemoryError
from pyvirtio.queue import QueueState, Virtqueue
from pyvirtio.queue.packed import PackedRing
from pyvirtio.queue.split import SplitRing, _used_struct
from pyvirtio.queue.virtqueue import ArmResult
from pyvirtio.runtime import CallbackService, Kick, QueueLoop, Step
from pyvirtio.spec import Feature

RINGS = ("split", "packed")
#: driver behaviours: `intr` keeps interrupts on and re-checks before it
#: sleeps; `napi` turns them off while it reaps and on (with the re-check)
#: only to sleep; `poll` turns them off for good (NO_INTERRUPT / event flags
#: DISABLE / used_event parked) and polls the used ring.
MODES = ("intr", "napi", "poll")
#: the three the issue asks for (device side, kick and completion), then two
#: more that show the lost-interrupt check is live: the device's StoreLoad
#: fence before its interrupt decision, the driver's re-check after enabling
MUTANTS = ("no-fence-after-arm", "no-recheck-after-arm", "used-before-element",
           "no-fence-before-interrupt-decision", "driver-sleeps-without-recheck")

KICK_FD = 1 << 30  # the model kick's "fd": only ever compared, never polled
BUF_LEN = 16      # each buffer: one device-writable segment of this size
WRITTEN = 8       # what the device reports writing into each

_BOTH = int(spec.PackedDescFlags.AVAIL | spec.PackedDescFlags.USED)
_AVAIL = int(spec.PackedDescFlags.AVAIL)
_USED = int(spec.PackedDescFlags.USED)


class Abort(BaseException):
    """Unwinds a parked model thread when its execution ends (never caught by
    the code under test, which catches `Exception` at most)."""


class Violation(Exception):
    """A property failed; `kind` names which."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# -- ring field names for traces ------------------------------------------------------------


class Namer:
    """Names guest addresses after the ring field they hold, and decodes
    the values traces show."""

    def __init__(self, packed: bool, q: int, desc: int, driver: int, device: int) -> None:
        self.packed = packed
        self.q = q
        self.desc, self.driver, self.device = desc, driver, device
        self.desc_end = desc + spec.desc_table_size(q)

    def name(self, gpa: int, n: int) -> str:
        q = self.q
        if self.desc <= gpa < self.desc_end:
            i, o = divmod(gpa - self.desc, 16)
            if o == 0 and n == 16:
                return f"desc[{i}]"
            if o == 0 and n % 16 == 0:
                return f"desc[{i}..{i + n // 16 - 1}]"
            if self.packed:
                if (o, n) == (0, 14):
                    return f"desc[{i}].addr|len|id"
                f = {8: "len", 12: "id", 14: "flags"}.get(o, f"+{o}")
                return f"desc[{i}].len|id|flags" if (o, n) == (8, 8) else f"desc[{i}].{f}"
            return f"desc[{i}].{ {8: 'len', 12: 'flags', 14: 'next'}.get(o, f'+{o}') }"
        if self.packed:
            for base, what in ((self.driver, "driver_event"), (self.device, "device_event")):
                if base <= gpa < base + 4:
                    o = gpa - base
                    return f"{what}" if n == 4 else f"{what}.{'off_wrap' if o == 0 else 'flags'}"
            return f"{gpa:#x}({n}B)"
        if self.driver <= gpa < self.driver + spec.avail_size(q):
            o = gpa - self.driver
            if o < 4:
                return "avail.flags" if o < 2 else "avail.idx"
            if o < 4 + 2 * q:
                i = (o - 4) // 2
                return f"avail.ring[{i}]" if n == 2 else f"avail.ring[{i}..{i + n // 2 - 1}]"
            return "used_event"
        if self.device <= gpa < self.device + spec.used_size(q):
            o = gpa - self.device
            if o < 4:
                return "used.flags" if o < 2 else "used.idx"
            if o < 4 + 8 * q:
                i = (o - 4) // 8
                return f"used.ring[{i}]" if n == 8 else f"used.ring[{i}..{i + n // 8 - 1}]"
            return "avail_event"
        return f"{gpa:#x}({n}B)"

    def value(self, gpa: int, data: bytes) -> str:
        n = len(data)
        name = self.name(gpa, n)
        if name.startswith("desc[") and n % 16 == 0 and (gpa - self.desc) % 16 == 0:
            out = []
            for a, ln, x, f in struct.iter_unpack("<QIHH", data):
                if self.packed:
                    out.append(f"addr={a:#x} len={ln} id={x} flags={self._pflags(f)}")
                else:
                    out.append(f"addr={a:#x} len={ln} flags={x:#x} next={f}")
            return "; ".join(out)
        if name.endswith("addr|len|id"):
            a, ln, x = struct.unpack("<QIH", data)
            return f"addr={a:#x} len={ln} id={x}"
        if name.startswith("avail.ring"):
            return " ".join(str(h) for (h,) in struct.iter_unpack("<H", data))
        if name.startswith("used.ring"):
            return " ".join(f"(id={i} len={ln})" for i, ln in struct.iter_unpack("<II", data))
        v = int.from_bytes(data, "little") if n <= 8 else None
        if v is None:
            return data.hex(" ", -2)
        if name.endswith("len|id|flags"):
            return f"len={v & 0xFFFFFFFF} id={v >> 32 & 0xFFFF} flags={self._pflags(v >> 48)}"
        if name.endswith(".flags") and name.startswith("desc"):
            return self._pflags(v)
        if name == "used.flags":
            return f"{v} ({'NO_NOTIFY' if v & 1 else 'notify'})"
        if name == "avail.flags":
            return f"{v} ({'NO_INTERRUPT' if v & 1 else 'interrupt'})"
        if name.endswith("_event.flags"):
            return f"{v} ({self._ev(v)})"
        if name in ("driver_event", "device_event"):
            return f"off={v & 0x7FFF} wrap={v >> 15 & 1} flags={self._ev(v >> 16)}"
        if name.endswith("off_wrap"):
            return f"off={v & 0x7FFF} wrap={v >> 15 & 1}"
        return str(v)

    @staticmethod
    def _ev(f: int) -> str:
        return ("ENABLE", "DISABLE", "DESC", "RESERVED")[f & 3]

    @staticmethod
    def _pflags(f: int) -> str:
        bits = [n for b, n in ((_AVAIL, "AVAIL"), (_USED, "USED"), (2, "WRITE"), (1, "NEXT"), (4, "INDIRECT"))
                if f & b]
        return "|".join(bits) or "0"


# -- the memory model ---------------------------------------------------------------------


class ModelArea(Area):
    """An `Area` whose every access goes through the execution's memory model."""

    __slots__ = ("x",)

    def __init__(self, kind: AreaKind, gpa: int, mv: memoryview, x: Machine) -> None:
        super().__init__(kind, gpa, mv)
        self.x = x

    def load16(self, off: int) -> int:
        return int.from_bytes(self.x.load(self.gpa + off, 2), "little")

    def load32(self, off: int) -> int:
        return int.from_bytes(self.x.load(self.gpa + off, 4), "little")

    def load64(self, off: int) -> int:
        return int.from_bytes(self.x.load(self.gpa + off, 8), "little")

    def store16(self, off: int, value: int) -> None:
        self.x.store(self.gpa + off, int(value).to_bytes(2, "little"))

    def store32(self, off: int, value: int) -> None:
        self.x.store(self.gpa + off, int(value).to_bytes(4, "little"))

    def store64(self, off: int, value: int) -> None:
        self.x.store(self.gpa + off, int(value).to_bytes(8, "little"))

    def load16s(self, off: int, count: int) -> list[int]:
        return list(struct.unpack(f"<{count}H", self.x.load(self.gpa + off, 2 * count)))

    def unpack(self, st: struct.Struct, off: int) -> tuple[int, ...]:
        return st.unpack(self.x.load(self.gpa + off, st.size))

    def unpack_many(self, st: struct.Struct, offsets: list[int]) -> list[tuple[int, ...]]:
        return [self.unpack(st, off) for off in offsets]

    def read(self, off: int, length: int) -> bytes:
        return self.x.load(self.gpa + off, length)

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        self.x.store(self.gpa + off, bytes(data))

    def _unmodelled(self, *_: Any) -> Any:
        raise NotImplementedError("the model memory does not intercept numpy bulk accesses: "
                                  "run services with bulk=False")

    np_load16s = np_gather = np_scatter64 = np_load16_strided = np_store64_strided = np_write = _unmodelled


class ModelMemory(GuestMemory):
    """`GuestMemory` whose ring areas, reads, writes and fences are modelled.
    Address translation and views (payload) are the wrapped memory's."""

    def __init__(self, inner: GuestMemory, x: Machine) -> None:
        self._regions = inner._regions
        self._starts = inner._starts
        self.x = x

    def area(self, kind: AreaKind, gpa: int, size: int, align: int = 1) -> Area:
        if align > 1 and gpa % align:
            raise GuestMemoryError(f"{kind.value} area at {gpa:#x} is not {align}-byte aligned", gpa, size)
        return ModelArea(kind, gpa, self.view(gpa, size), self.x)

    def read(self, gpa: int, length: int, kind: AreaKind = AreaKind.PAYLOAD) -> bytes:
        self.view(gpa, length)  # one region (the model has one)
        return self.x.load(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview, kind: AreaKind = AreaKind.PAYLOAD) -> None:
        self.view(gpa, len(data))
        self.x.store(gpa, bytes(data))

    def fence(self) -> None:
        self.x.fence()


# -- model threads and operations -------------------------------------------------------------

RUN, FLUSH = 0, 1


class Op:
    """A pending visible operation: `label` for traces and states; `ready`
    says whether it can run now (None: always); `drains`: it waits until the
    thread's own store buffer is empty (a fence, or a release)."""

    __slots__ = ("drains", "label", "ready")

    def __init__(self, label: str, ready: Callable[[], bool] | None = None, drains: bool = False) -> None:
        self.label = label
        self.ready = ready
        self.drains = drains


_START = Op("start")


class MThread:
    __slots__ = ("buf", "done", "idx", "name", "ops", "pending", "sem", "thread")

    def __init__(self, idx: int, name: str) -> None:
        self.idx = idx
        self.name = name
        self.sem = threading.Semaphore(0)
        self.pending: Op | None = _START
        self.done = False
        self.buf: deque[tuple[int, bytes]] = deque()
        self.ops = 0          # visible operations executed (program position, for states)
        self.thread: threading.Thread | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    ring: str = "split"
    event_idx: bool = False
    mode: str = "intr"
    buffers: int = 2          # one buffer per publish
    size: int = 4
    preemptions: int = 2
    mutant: str | None = None
    #: start just before the wrap: split indices at 65535 (the u16 wraps and
    #: the last ring slot comes first), packed at the last slot (the wrap
    #: counters flip during the run)
    wrap: bool = False
    max_steps: int = 4000

    def label(self) -> str:
        m = f" mutant={self.mutant}" if self.mutant else ""
        w = " wrap" if self.wrap else ""
        return (f"{self.ring:6s} event_idx={'on ' if self.event_idx else 'off'} driver={self.mode:4s} "
                f"K={self.buffers} P={self.preemptions}{w}{m}")


class Machine:
    """The scheduler and the store-buffer memory, for any set of threads.

    One run under a schedule: replays `prefix` (indices into the options at
    each choice point), then takes the first option (the default action)
    wherever it has a choice. `expect` are the option counts the previous run
    saw along the prefix (a mismatch means the code under test is not
    deterministic). `gmv` is memory as every thread sees it.
    """

    #: byte range of `gmv` that makes up the shared state (for counting states)
    state_span = (0, 0)

    def __init__(self, gmv: memoryview, names: list[str], prefix: list[int], expect: list[int] | None,
                 states: set[int] | None, max_steps: int) -> None:
        self.gmv = gmv
        self.prefix = prefix
        self.expect = expect
        self.record: list[tuple[int, int, bool, int]] = []  # (options, chosen, had default, preemptions before)
        self.preemptions = 0
        self.steps = 0
        self.max_steps = max_steps
        self.states = states
        self.trace: list[tuple[Any, ...]] = []
        self.threads = [MThread(i, n) for i, n in enumerate(names)]
        self.by_ident: dict[int, MThread] = {}
        self.current: MThread | None = None
        self.finished = threading.Event()
        self.abort = False
        self.violation: Violation | None = None
        self.namer: Namer | None = None

    # -- hooks ----------------------------------------------------------------------------------

    def check(self) -> Violation | None:
        """A property that fails in the current state (checked at every step)."""
        return None

    def terminal(self) -> None:
        """Nothing can move: the run ended (all done) or is stuck."""
        stuck = [t.name for t in self.threads if not t.done]
        if stuck:
            self._fail(Violation("deadlock", f"nothing can move; blocked: {', '.join(stuck)}"))
        else:
            self.finished.set()

    def state_extra(self) -> tuple[Any, ...]:
        return ()

    # -- what the threads call (through ModelMemory) ---------------------------------------

    def _me(self) -> MThread | None:
        return self.by_ident.get(threading.get_ident())

    def load(self, gpa: int, n: int) -> bytes:
        t = self._me()
        if t is None:
            return bytes(self.gmv[gpa : gpa + n])
        if not self._covered(t, gpa, n):
            self.point(t, Op(f"load@{gpa}"))
            kind = "load"
        else:
            kind = "load (own buffer)"
        data = self._overlay(t, gpa, n)
        self.trace.append((t.name, kind, gpa, data, _site()))
        return data

    def store(self, gpa: int, data: bytes) -> None:
        t = self._me()
        if t is None:
            self.gmv[gpa : gpa + len(data)] = data
            return
        t.buf.append((gpa, data))
        self.trace.append((t.name, "store (buffered)", gpa, data, _site()))

    def fence(self) -> None:
        t = self._me()
        if t is None:
            return
        if t.buf:
            self.point(t, Op("fence", lambda: not t.buf, True))
        self.trace.append((t.name, "fence", "", "", _site()))

    def wait(self, t: MThread, label: str, ready: Callable[[], bool]) -> None:
        self.trace.append((t.name, "block", label, ""))
        self.point(t, Op(label, ready))
        self.trace.append((t.name, "wake", label, ""))

    @staticmethod
    def _covered(t: MThread, gpa: int, n: int) -> bool:
        if not t.buf:
            return False
        mask = 0
        full = (1 << n) - 1
        for a, d in t.buf:
            lo, hi = max(a, gpa), min(a + len(d), gpa + n)
            if lo < hi:
                mask |= ((1 << (hi - lo)) - 1) << (lo - gpa)
                if mask == full:
                    return True
        return False

    def _overlay(self, t: MThread, gpa: int, n: int) -> bytes:
        data = bytes(self.gmv[gpa : gpa + n])
        if not t.buf:
            return data
        b = bytearray(data)
        for a, d in t.buf:  # oldest first: newer stores win
            lo, hi = max(a, gpa), min(a + len(d), gpa + n)
            if lo < hi:
                b[lo - gpa : hi - gpa] = d[lo - a : hi - a]
        return bytes(b)

    def point(self, t: MThread, op: Op) -> None:
        """Park `t` before `op` until the scheduler runs it."""
        t.pending = op
        if not self._schedule(t):
            t.sem.acquire()
            if self.abort:
                raise Abort
        t.pending = None
        t.ops += 1

    def _ready(self, t: MThread) -> bool:
        op = t.pending
        if op is None or t.done:
            return False
        return op.ready is None or op.ready()

    def _schedule(self, me: MThread | None) -> bool:
        """Take actions until one is "run a thread". True: run `me` now
        (the caller goes on); False: another thread runs (or the execution
        ended) and the caller must park."""
        while True:
            self.steps += 1
            if self.steps > self.max_steps:
                self._fail(Violation("livelock", f"no end after {self.max_steps} steps"))
                return False
            if self.states is not None:
                self.states.add(self._state())
            v = self.check()
            if v is not None:
                self._fail(v)
                return False
            cur = self.current
            default: tuple[int, MThread] | None = None
            if cur is not None and cur.pending is not None and not cur.done:
                if self._ready(cur):
                    default = (RUN, cur)
                elif cur.pending.drains and cur.buf:
                    default = (FLUSH, cur)
            opts = [default] if default is not None else []
            for t in self.threads:
                if (default is None or default[1] is not t or default[0] != RUN) and self._ready(t):
                    opts.append((RUN, t))
            for t in self.threads:
                if t.buf and (default is None or default[1] is not t or default[0] != FLUSH):
                    opts.append((FLUSH, t))
            if not opts:
                self.terminal()
                return False
            kind, t = self._choose(opts, default is not None)
            if kind == FLUSH:
                gpa, data = t.buf.popleft()
                self.gmv[gpa : gpa + len(data)] = data
                self.trace.append((t.name, "flush", gpa, data))
                if t is cur and cur.pending is not None and cur.pending.drains and not t.buf:
                    return True if t is me else self._handoff(t)  # the fence (or release) completes
                continue
            return True if t is me else self._handoff(t)

    def _handoff(self, t: MThread) -> bool:
        if t is not self.current:
            self.trace.append((t.name, "-- runs --", "", ""))
        self.current = t
        t.sem.release()
        return False

    def _choose(self, opts: list[tuple[int, MThread]], has_default: bool) -> tuple[int, MThread]:
        n = len(opts)
        if n == 1:
            return opts[0]
        d = len(self.record)
        if d < len(self.prefix):
            i = self.prefix[d]
            if self.expect is not None and self.expect[d] != n:
                raise RuntimeError(f"nondeterministic replay at choice {d}: {n} options, expected {self.expect[d]}")
        else:
            i = 0
        self.record.append((n, i, has_default, self.preemptions))
        if has_default and i:
            self.preemptions += 1
            self.trace.append(("", f"-- preemption {self.preemptions} --", "", ""))
        return opts[i]

    def _fail(self, v: Violation) -> None:
        if self.violation is None:
            self.violation = v
        self.finished.set()

    def _body(self, t: MThread, fn: Callable[[], None]) -> None:
        self.by_ident[threading.get_ident()] = t
        t.sem.acquire()
        if self.abort:
            return
        t.pending = None
        try:
            fn()
        except Abort:
            return
        except Violation as v:
            self._fail(v)
            return
        except Exception as e:  # noqa: BLE001 - the code under test failed: a counterexample too
            self._fail(Violation("crash", f"{t.name} raised {type(e).__name__}: {e}"))
            return
        t.done = True
        if not self._schedule(t):
            return

    def _state(self) -> int:
        lo, hi = self.state_span
        return hash((bytes(self.gmv[lo:hi]), self.state_extra(),
                     tuple((tuple(t.buf), t.done, t.pending.label if t.pending else None, t.ops)
                           for t in self.threads)))

    def run(self, bodies: list[Callable[[], None]]) -> None:
        """Run the threads' `bodies` under this schedule, to the end."""
        for t, fn in zip(self.threads, bodies):
            t.thread = threading.Thread(target=self._body, args=(t, fn), daemon=True)
            t.thread.start()
        while len(self.by_ident) < len(self.threads):
            time.sleep(0)
        self._schedule(None)
        if not self.finished.wait(60):  # pragma: no cover - a checker bug, not a counterexample
            self.abort = True
            for t in self.threads:
                t.sem.release()
            raise RuntimeError("a model execution made no progress for 60 s")
        self.abort = True
        for t in self.threads:
            t.sem.release()
        for t in self.threads:
            assert t.thread is not None
            t.thread.join(5)
            if t.thread.is_alive():  # pragma: no cover
                raise RuntimeError(f"model thread {t.name} did not stop")

    def format_trace(self) -> str:
        """The interleaving, one line per operation: thread, operation,
        ring field, value (stores enter the thread's buffer; a flush makes
        one visible to the other thread)."""
        lines = []
        for who, op, where, val, *rest in self.trace:
            site = rest[0] if rest else ""
            if who == "":
                lines.append(f"      {op}")
                continue
            if isinstance(where, int):
                if self.namer is not None:
                    where, val = self.namer.name(where, len(val)), self.namer.value(where, val)
                else:
                    where, val = f"{where:#x}", val.hex()
            line = f"      {who:6s} {op:17s} {where:22s} {val}".rstrip()
            if site:
                line = f"{line:90s}  [{site}]"
            lines.append(line)
        if self.violation is not None:
            lines.append(f"      => {self.violation}")
        return "\n".join(lines)


class Execution(Machine):
    """One run of the scenario (the device loop and the driver) under a schedule."""

    def __init__(self, cfg: Config, raw: GuestMemory, prefix: list[int], expect: list[int] | None,
                 states: set[int] | None) -> None:
        super().__init__(raw.regions[0].mv, ["device", "driver"], prefix, expect, states, cfg.max_steps)
        self.cfg = cfg
        self.raw = raw
        self.kicks = 0          # the kick eventfd's counter
        self.irqs = 0           # the call eventfd's counter
        self.driver_in_publish = False   # between publish() and the kick it decided
        self.device_in_publish = False   # between the used-ring publication and its interrupt
        self.driver_done = False
        self.completed: dict[object, int] = {}
        self.cover: set[str] = set()   # protocol situations this execution reached
        self._setup()

    # -- scenario ---------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        packed = cfg.ring == "packed"
        q = cfg.size
        self.mem = ModelMemory(self.raw, self)
        base = 0x1000
        desc, driver, device, end = ring_layout(packed, q, base)
        self.layout = (desc, driver, device)
        self.state_span = (base, end)
        self.namer = Namer(packed, q, desc, driver, device)
        pool = BufferPool(self.raw, (end + 0xFFF) & ~0xFFF, 0x1000)
        cls = PackedDriver if packed else SplitDriver
        # set-up accesses (ring initialisation) happen before any model thread
        # runs: they go straight to memory
        start = (q - 1 if packed else 0xFFFF) if cfg.wrap else 0
        self.drv = cls(self.mem, q, desc, driver, device, event_idx=cfg.event_idx, pool=pool, start_index=start)
        self.bufs = [pool.alloc(BUF_LEN) for _ in range(cfg.buffers)]
        features = int(Feature.VERSION_1)
        if packed:
            features |= Feature.RING_PACKED
        if cfg.event_idx:
            features |= Feature.RING_EVENT_IDX
        state = None
        if start:  # the device resumes where the driver starts (vhost-user SET_VRING_BASE)
            state = (QueueState(q, True, start, True, start, True) if packed
                     else QueueState(q, False, last_avail=start, used_idx=start))
        self.vq = Virtqueue(self.mem, q, desc, driver, device, features=features, name="mc", state=state)
        self.loop = _ModelLoop(self.vq, _ModelKick(self), self._call)
        self.loop.machine = self
        self.loop.attach(lambda queue: CallbackService(
            queue, lambda chains: [(c, WRITTEN) for c in chains], batch=64, bulk=False))
        self.dev_t, self.drv_t = self.threads

    def _device(self) -> None:
        loop, vq = self.loop, self.vq
        me = self.dev_t
        woke_with: int | None = None  # chains taken when it last woke
        while True:
            s = loop.step()
            if vq.failed is not None or loop.counters.errors:
                raise Violation("ring-error", f"the device retired the ring: {vq.failed!r}")
            if s is Step.BUSY:
                continue
            if s is Step.STOPPED:
                return
            if woke_with is not None and vq.stats.chains == woke_with:
                self.cover.add("device woke to a stale kick and slept again (already armed)")
            # what the real thread would poll: the kick only if the loop armed
            fds = loop.sleep_fds()
            if (KICK_FD in fds) != loop._armed or loop.sleep_timeout() is not None:
                raise Violation("crash", f"the loop sleeps on {fds} (timeout {loop.sleep_timeout()}) "
                                f"with armed={loop._armed}")
            if KICK_FD in fds:
                self.wait(me, "sleep (armed)", lambda: self.kicks > 0 and not self.driver_done)
            else:  # only the loop's own wake fd: nothing in this scenario writes it
                self.wait(me, "sleep (NOT armed)", lambda: False)
            woke_with = vq.stats.chains
            loop.woke()

    def _driver(self) -> None:
        cfg, drv, me = self.cfg, self.drv, self.drv_t
        if cfg.mode in ("poll", "napi"):
            drv.disable_interrupts()
        for tok in range(cfg.buffers):
            drv.add([], [(self.bufs[tok], BUF_LEN)], token=tok)
            self.driver_in_publish = True
            if drv.publish():
                self.counter_op(me, "kick", "kick")
            else:
                self.cover.add("driver skipped a kick (device asked for none)")
            self.driver_in_publish = False
        got = self.completed
        while len(got) < cfg.buffers:
            try:
                reaped = drv.get_used()
            except DeviceProtocolError as e:
                raise Violation("exactly-once", f"driver rejected a used element: {e}") from None
            for tok, ln in reaped:
                if tok in got:
                    raise Violation("exactly-once", f"buffer {tok} completed twice")
                if ln != WRITTEN:
                    raise Violation("exactly-once", f"buffer {tok} came back with length {ln}, the device "
                                    f"wrote {WRITTEN} (a stale used element)")
                got[tok] = ln
            if reaped:
                continue
            if cfg.mode == "poll":
                self.wait(me, "poll the used ring", self.used_visible)
                continue
            if drv.enable_interrupts():
                self.cover.add("driver's re-check after enabling interrupts found a completion")
                continue
            self.wait(me, "wait for interrupt", lambda: self.irqs > 0)
            self.irqs = 0  # the eventfd read
            if cfg.mode == "napi":
                drv.disable_interrupts()
        self.driver_done = True

    def _call(self) -> None:
        self.counter_op(self.dev_t, "interrupt", "call")

    # -- what memory shows (global, no scheduling) ------------------------------------------

    def _u16(self, gpa: int) -> int:
        return self.gmv[gpa] | self.gmv[gpa + 1] << 8

    def unseen_avail(self) -> bool:
        """Memory shows a published buffer the device has not taken."""
        ring = self.vq.ring
        if isinstance(ring, PackedRing):
            f = self._u16(self.layout[0] + ring.next_avail * 16 + spec.PACKED_FLAGS)
            return f & _BOTH == (_AVAIL if ring.avail_wrap else _USED)
        return self._u16(self.layout[1] + spec.AVAIL_IDX) != ring.last_avail

    def _avail_state(self) -> str:
        ring = self.vq.ring
        if isinstance(ring, PackedRing):
            return f"desc[{ring.next_avail}] is available, the device's next slot"
        return f"avail.idx {self._u16(self.layout[1] + spec.AVAIL_IDX)}, device took up to {ring.last_avail}"

    def _used_state(self) -> str:
        drv = self.drv
        if isinstance(drv, PackedDriver):
            return f"desc[{drv.last_used}] is used, the driver's next slot"
        return f"used.idx {self._u16(self.layout[2] + spec.USED_IDX)}, driver reaped up to {drv.last_used}"

    def used_visible(self) -> bool:
        """Memory shows a completion the driver has not reaped."""
        drv = self.drv
        if isinstance(drv, PackedDriver):
            f = self._u16(self.layout[0] + drv.last_used * 16 + spec.PACKED_FLAGS)
            return f & _BOTH == drv._used_want
        return self._u16(self.layout[2] + spec.USED_IDX) != drv.last_used

    def counter_op(self, t: MThread, what: str, label: str) -> None:
        # An eventfd write goes through the kernel's locks: a release. The
        # thread's earlier stores are visible before the counter moves.
        if t.buf:
            self.point(t, Op(label, lambda: not t.buf, True))
        else:
            self.point(t, Op(label))
        if what == "kick":
            self.kicks += 1
            self.trace.append((t.name, "kick", "kick eventfd", f"-> {self.kicks}"))
        else:
            self.irqs += 1
            self.trace.append((t.name, "interrupt", "call eventfd", f"-> {self.irqs}"))

    def drain_kick(self) -> int:
        t = self.dev_t
        self.point(t, Op("drain kick"))
        n, self.kicks = self.kicks, 0
        self.trace.append((t.name, "drain kick", "kick eventfd", str(n), _site()))
        return n

    def check(self) -> Violation | None:
        dev, drv = self.dev_t, self.drv_t
        dp = dev.pending
        if (dp is not None and dp.label.startswith("sleep") and self.kicks == 0 and not self.driver_in_publish
                and not self.driver_done and self.unseen_avail()):
            return Violation("lost-kick", "the device sleeps with no kick pending while memory shows "
                             f"a published buffer it has not taken ({self._avail_state()}), and the "
                             "driver decided not to kick")
        rp = drv.pending
        if (rp is not None and rp.label == "wait for interrupt" and self.irqs == 0
                and not self.device_in_publish and self.used_visible()):
            return Violation("lost-interrupt", "the driver waits for an interrupt it asked for, none is "
                             f"pending, and memory shows a completion it has not reaped ({self._used_state()})")
        return None

    def _coverage(self) -> None:
        st = self.vq.stats
        if st.rearm_hits:
            self.cover.add("device's re-check after arming found work")
        if st.publishes > st.interrupts:
            self.cover.add("device skipped an interrupt (driver asked for none)")
        if st.suppressions:
            self.cover.add("device found work while armed (lazy kick suppression)")
        # the two races the protocol exists for, both in one execution
        if st.rearm_hits and "driver skipped a kick (device asked for none)" in self.cover:
            self.cover.add("a skipped kick and a device re-check hit")
        if (st.publishes > st.interrupts
                and "driver's re-check after enabling interrupts found a completion" in self.cover):
            self.cover.add("a skipped interrupt and a driver re-check hit")

    def terminal(self) -> None:
        dev, drv = self.dev_t, self.drv_t
        if self.driver_done and (dev.done or (dev.pending is not None and dev.pending.label.startswith("sleep"))):
            if self.vq.stats.completed != self.cfg.buffers:
                self._fail(Violation("exactly-once", f"the device completed {self.vq.stats.completed} chains "
                                     f"for {self.cfg.buffers} buffers"))
                return
            self.finished.set()
            return
        what = f"device: {dev.pending.label if dev.pending else 'done'}; driver: " \
               f"{drv.pending.label if drv.pending else 'done'}"
        if self.unseen_avail():
            kind = "lost-kick"
        elif drv.pending is not None and drv.pending.label == "wait for interrupt" and self.used_visible():
            kind = "lost-interrupt"
        else:
            kind = "deadlock"
        self._fail(Violation(kind, f"deadlock: nothing can move ({what})"))

    def state_extra(self) -> tuple[Any, ...]:
        return (self.kicks, self.irqs)

    def run(self) -> None:  # type: ignore[override]
        try:
            super().run([self._device, self._driver])
            self._coverage()
        finally:
            self.loop.close()


_HERE = __file__


def _site() -> str:
    """The engine or driver function doing the access (and its caller)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename == _HERE:
        f = f.f_back
    if f is None:
        return ""
    name = f.f_code.co_qualname
    g = f.f_back
    if g is not None and g.f_code.co_filename != _HERE and "pyvirtio" in g.f_code.co_filename:
        name = f"{name} < {g.f_code.co_qualname}"
    return name


class _ModelLoop(QueueLoop):
    """The real loop; its publication marks "an interrupt may be on its way"."""

    machine: Machine

    def publish(self) -> None:
        self.machine.device_in_publish = True
        super().publish()
        self.machine.device_in_publish = False


class _ModelKick(Kick):
    """The kick eventfd as the device loop sees it."""

    def __init__(self, x: Machine) -> None:
        self.fd = KICK_FD  # no eventfd: the model's kick state stands for it
        self.x = x

    def fileno(self) -> int:
        return KICK_FD

    def drain(self) -> int:
        return self.x.drain_kick()


# -- exploration -------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """What a search did: `executions` (interleavings run to the end),
    `steps` (scheduler decisions over all of them), `states` (distinct
    shared states seen: guest ring memory, store buffers, kick and interrupt
    counters, and each thread's pending operation and position in its own
    sequence of visible operations)."""

    config: Config
    executions: int = 0
    steps: int = 0
    states: int = 0
    seconds: float = 0.0
    complete: bool = True     # the bounded search space was exhausted
    violation: Violation | None = None
    schedule: list[int] | None = None
    trace: str = ""
    found_at: int | None = None     # the preemption bound the counterexample needed
    coverage: dict[str, int] = dataclasses.field(default_factory=dict)  # situation -> executions reaching it

    def row(self) -> str:
        found = self.violation.kind if self.violation else "none"
        return (f"{self.config.label():84s} {self.executions:8d} {self.steps:9d} {self.states:8d} "
                f"{self.seconds:7.2f}s  {found}")

    def report(self) -> str:
        if self.violation is None:
            return f"{self.config.label()}: no counterexample in {self.executions} interleavings"
        at = "" if self.found_at is None else f" (needs {self.found_at} preemption{'s' * (self.found_at != 1)})"
        return (f"{self.config.label()}: COUNTEREXAMPLE after {self.executions} interleavings{at}\n"
                f"  {self.violation}\n  schedule: {self.schedule}\n{self.trace}")


def explore(cfg: Config, *, stop_at_first: bool = True, max_executions: int | None = None,
            count_states: bool = True) -> Result:
    """Explore every interleaving of `cfg` within its preemption bound
    (depth-first, stateless). Stops at the first counterexample unless told
    otherwise."""
    res = Result(cfg)
    raw = GuestMemory.anonymous(0x4000, shared_fd=False)
    states: set[int] | None = set() if count_states else None
    t0 = time.perf_counter()
    try:
        with mutant(cfg.mutant):
            for x in executions(lambda prefix, expect: Execution(cfg, raw, prefix, expect, states),
                                cfg.preemptions):
                res.executions += 1
                res.steps += x.steps
                for c in x.cover:
                    res.coverage[c] = res.coverage.get(c, 0) + 1
                if x.violation is not None and res.violation is None:
                    res.violation = x.violation
                    res.schedule = [r[1] for r in x.record]
                    res.trace = x.format_trace()
                    if stop_at_first:
                        break
                if max_executions is not None and res.executions >= max_executions:
                    res.complete = False
                    break
    finally:
        raw.close()
    res.seconds = time.perf_counter() - t0
    res.states = len(states) if states is not None else 0
    return res


def executions(make: Callable[[list[int], list[int] | None], Machine], bound: int) -> Iterator[Any]:
    """Every execution within `bound` preemptions, depth-first: `make(prefix,
    expect)` builds a fresh machine; each is run and yielded."""
    prefix: list[int] = []
    expect: list[int] | None = []
    while True:
        x = make(prefix, expect)
        x.run()
        yield x
        nxt = _backtrack(x.record, bound)
        if nxt is None:
            return
        prefix, expect = nxt


def find_counterexample(cfg: Config) -> Result:
    """Search with bounds 0, 1, ... up to `cfg.preemptions` (iterative
    deepening): the first counterexample found needs the fewest preemptions,
    which keeps its trace short. Counts add up over the rounds."""
    total = Result(cfg)
    for bound in range(cfg.preemptions + 1):
        r = explore(dataclasses.replace(cfg, preemptions=bound))
        total.executions += r.executions
        total.steps += r.steps
        total.states = max(total.states, r.states)
        total.seconds += r.seconds
        if r.violation is not None:
            total.violation, total.schedule, total.trace = r.violation, r.schedule, r.trace
            total.found_at = bound
            break
    return total


def _backtrack(record: list[tuple[int, int, bool, int]], bound: int) -> tuple[list[int], list[int]] | None:
    """The next schedule prefix in depth-first order, or None when done."""
    for d in range(len(record) - 1, -1, -1):
        n, i, has_default, before = record[d]
        if i + 1 < n and (not has_default or before + 1 <= bound):
            return [r[1] for r in record[:d]] + [i + 1], [r[0] for r in record[: d + 1]]
    return None


def replay(cfg: Config, schedule: list[int]) -> Execution:
    """Run one schedule again (for a counterexample's trace)."""
    raw = GuestMemory.anonymous(0x4000, shared_fd=False)
    try:
        with mutant(cfg.mutant):
            x = Execution(cfg, raw, schedule, None, None)
            x.run()
    finally:
        raw.close()
    return x


class Litmus(Machine):
    """A litmus test for the memory model itself: `programs` are per-thread
    lists of ("st", addr, value), ("ld", addr) and ("fence",) over one-byte
    cells; the outcome is the tuple of values loaded, in program order."""

    def __init__(self, programs: list[list[tuple[Any, ...]]], prefix: list[int], expect: list[int] | None) -> None:
        super().__init__(memoryview(bytearray(16)), [f"T{i}" for i in range(len(programs))], prefix, expect,
                         None, 1000)
        self.programs = programs
        self.loaded: list[list[int]] = [[] for _ in programs]

    def _thread(self, i: int) -> None:
        for op in self.programs[i]:
            if op[0] == "st":
                self.store(op[1], bytes([op[2]]))
            elif op[0] == "ld":
                self.loaded[i].append(self.load(op[1], 1)[0])
            else:
                self.fence()

    def run(self) -> None:  # type: ignore[override]
        super().run([lambda i=i: self._thread(i) for i in range(len(self.programs))])

    def outcome(self) -> tuple[int, ...]:
        return tuple(v for regs in self.loaded for v in regs)


def litmus(programs: list[list[tuple[Any, ...]]], bound: int = 2) -> set[tuple[int, ...]]:
    """Every outcome of a litmus test within `bound` preemptions."""
    return {x.outcome() for x in executions(lambda p, e: Litmus(programs, p, e), bound)}


# -- mutants: copies of engine functions with one protocol step removed -------------------------

_WORK, _SLEEP = ArmResult.WORK, ArmResult.SLEEP


def _arm_without_fence(self: Virtqueue) -> ArmResult:
    """`Virtqueue.arm` without the full fence after enabling kicks."""
    if self.failed is not None:
        return _WORK if self._unreported is not None else _SLEEP
    if self._restored is not None or self._redeliver:
        return _WORK
    ring = self.ring
    if ring.unconsumed():
        return _WORK
    if self.armed or self.eager:
        return _WORK if ring.peek() else _SLEEP
    ring.enable_kicks()
    self.armed = True
    self.stats.arms += 1
    # MUTANT: no self.mem.fence() here
    if ring.recheck():
        self.stats.rearm_hits += 1
        return _WORK
    return _SLEEP


def _arm_without_recheck(self: Virtqueue) -> ArmResult:
    """`Virtqueue.arm` that sleeps without looking at the ring after the fence."""
    if self.failed is not None:
        return _WORK if self._unreported is not None else _SLEEP
    if self._restored is not None or self._redeliver:
        return _WORK
    ring = self.ring
    if ring.unconsumed():
        return _WORK
    if self.armed or self.eager:
        return _WORK if ring.peek() else _SLEEP
    ring.enable_kicks()
    self.armed = True
    self.stats.arms += 1
    self.mem.fence()
    return _SLEEP  # MUTANT: no ring.recheck()


def _split_publish_index_first(self: SplitRing, items: Any) -> bool:
    """`SplitRing.publish` (chain path) storing used.idx before the used elements."""
    q = self.size
    old = self.used_idx
    start = old & (q - 1)
    used = self.used
    k = len(items)
    new = (old + k) & 0xFFFF
    used.store16(spec.USED_IDX, new)  # MUTANT: the index first
    flat: list[int] = []
    for chain, written in items:
        flat.append(chain.id)
        flat.append(written)
    if start + k <= q:
        used.write(spec.USED_RING + 8 * start, _used_struct(k).pack(*flat))
    else:
        first = q - start
        used.write(spec.USED_RING + 8 * start, _used_struct(first).pack(*flat[: 2 * first]))
        used.write(spec.USED_RING, _used_struct(k - first).pack(*flat[2 * first :]))
    self.used_idx = new
    self.mem.fence()
    if not self.signalled_valid:
        self.signalled_valid = True
        return True
    if self.event_idx:
        return spec.vring_need_event(self.used_event.load16(0), new, old)
    return not self.avail.load16(spec.AVAIL_FLAGS) & int(spec.AvailFlags.NO_INTERRUPT)


def _packed_publish_flags_first(self: PackedRing, items: Any) -> bool:
    """`PackedRing.publish` (chain path) storing each used descriptor's flags
    before its id and length (instead of one 8-byte len|id|flags store)."""
    q = self.size
    u = old = self.next_used
    wrap = self.used_wrap
    used_flags = _BOTH if wrap else 0
    freed = 0
    for chain, written in items:
        word = used_flags | int(spec.PackedDescFlags.WRITE) if chain.writable_len else used_flags
        off = u * spec.DESC_SIZE
        self.desc.store16(off + spec.PACKED_FLAGS, word)  # MUTANT: flags first
        self.desc.store32(off + spec.PACKED_LEN, written)
        self.desc.store16(off + spec.PACKED_ID, chain.id)
        u += chain.slots
        freed += chain.slots
        if u >= q:
            u -= q
            wrap = not wrap
            used_flags = _BOTH if wrap else 0
    self.next_used = u
    self.used_wrap = wrap
    self.in_flight_slots -= freed
    self.mem.fence()
    if not self.signalled_valid:
        self.signalled_valid = True
        return True
    ev = self.driver_event.load32(0)
    mode = ev >> 16 & 3
    if mode == int(spec.EventFlags.DISABLE):
        return False
    if mode == int(spec.EventFlags.DESC) and self.event_idx:
        return spec.packed_need_event(ev & 0xFFFF, u, old, int(wrap), q)
    return True


def _without_fence(orig: Callable[..., bool]) -> Callable[..., bool]:
    """A ring `publish` whose one fence (StoreLoad, before it reads the
    driver's interrupt suppression) does nothing."""
    def publish(self: Any, items: Any) -> bool:
        self.mem.fence = lambda: None  # an instance attribute shadows the method
        try:
            return orig(self, items)
        finally:
            del self.mem.fence
    return publish


def _ignoring_recheck(orig: Callable[..., bool]) -> Callable[..., bool]:
    """A driver `enable_interrupts` whose caller never hears that used
    buffers arrived meanwhile (it sleeps anyway)."""
    def enable_interrupts(self: Any, delayed: bool = False) -> bool:
        orig(self, delayed)
        return False
    return enable_interrupts


def _copy(fn: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda orig: fn


#: mutant -> (class, attribute, make(original) -> replacement)
_MUTANT_PATCHES: dict[str, list[tuple[type, str, Callable[[Callable[..., Any]], Callable[..., Any]]]]] = {
    "no-fence-after-arm": [(Virtqueue, "arm", _copy(_arm_without_fence))],
    "no-recheck-after-arm": [(Virtqueue, "arm", _copy(_arm_without_recheck))],
    "used-before-element": [(SplitRing, "publish", _copy(_split_publish_index_first)),
                            (PackedRing, "publish", _copy(_packed_publish_flags_first))],
    "no-fence-before-interrupt-decision": [(SplitRing, "publish", _without_fence),
                                           (PackedRing, "publish", _without_fence)],
    "driver-sleeps-without-recheck": [(SplitDriver, "enable_interrupts", _ignoring_recheck),
                                      (PackedDriver, "enable_interrupts", _ignoring_recheck)],
}


@contextlib.contextmanager
def mutant(name: str | None) -> Iterator[None]:
    """Patch the engine with mutant `name` (None: the real code) for the block."""
    if name is None:
        yield
        return
    patches = _MUTANT_PATCHES[name]
    saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _ in patches]
    try:
        for cls, attr, make in patches:
            setattr(cls, attr, make(cls.__dict__[attr]))
        yield
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)


# -- command line -------------------------------------------------------------------------------


#: the driver behaviour each mutant is checked with: the interrupt-side ones
#: need a driver that turns interrupts off and on again
MUTANT_MODE = {"no-fence-after-arm": "intr", "no-recheck-after-arm": "intr", "used-before-element": "intr",
               "no-fence-before-interrupt-decision": "napi", "driver-sleeps-without-recheck": "napi"}


def configs(preemptions: int, buffers: int, rings: list[str], modes: list[str],
            event_idx: list[bool], wraps: list[bool]) -> list[Config]:
    return [Config(ring=r, event_idx=e, mode=m, buffers=buffers, preemptions=preemptions, wrap=w,
                   size=max(4, 1 << (buffers - 1).bit_length()))
            for w, r, e, m in itertools.product(wraps, rings, event_idx, modes)]


HEADER = f"{'configuration':84s} {'interl.':>8s} {'steps':>9s} {'states':>8s} {'time':>8s}  counterexample"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Exit status 1 if the real code has a counterexample or a mutant has none.")
    p.add_argument("--preemptions", type=int, default=3, help="preemption bound (default 3)")
    p.add_argument("--buffers", type=int, default=3, help="buffers the driver posts, one per publish (default 3)")
    p.add_argument("--ring", action="append", choices=RINGS, help="ring format (repeatable; default both)")
    p.add_argument("--mode", action="append", choices=MODES, help="driver behaviour (repeatable; default all)")
    p.add_argument("--event-idx", choices=("on", "off", "both"), default="both")
    p.add_argument("--wrap", choices=("on", "off", "both"), default="off",
                   help="start the rings just before their indices wrap (default off)")
    p.add_argument("--no-mutants", action="store_true", help="skip the mutants")
    p.add_argument("--max-executions", type=int, default=None, help="stop each configuration after this many")
    p.add_argument("--trace", action="store_true", help="print each mutant's counterexample interleaving")
    a = p.parse_args(argv)
    both = {"on": [True], "off": [False], "both": [False, True]}
    rings = a.ring or list(RINGS)
    cfgs = configs(a.preemptions, a.buffers, rings, a.mode or list(MODES), both[a.event_idx], both[a.wrap])
    print(f"real code, every interleaving within {a.preemptions} preemptions, {a.buffers} buffers")
    print(HEADER)
    bad = 0
    total = Result(Config())
    for cfg in cfgs:
        r = explore(cfg, max_executions=a.max_executions)
        print(r.row() + ("" if r.complete else "  (cut short)"), flush=True)
        total.executions += r.executions
        total.steps += r.steps
        total.seconds += r.seconds
        if r.violation is not None:
            bad += 1
            print(r.report())
    print(f"{'total':84s} {total.executions:8d} {total.steps:9d} {'':8s} {total.seconds:7.2f}s")
    if not a.no_mutants:
        print(f"\nmutants, searched with 0, 1, ... {a.preemptions} preemptions until the first counterexample")
        print(HEADER)
        for m in MUTANTS:
            for ring in rings:
                cfg = Config(ring=ring, event_idx=True, mode=MUTANT_MODE[m], buffers=2,
                             preemptions=a.preemptions, mutant=m)
                r = find_counterexample(cfg)
                print(r.row() + (f" at {r.found_at}" if r.found_at is not None else ""), flush=True)
                if r.violation is None:
                    bad += 1
                elif a.trace:
                    print(r.report())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
