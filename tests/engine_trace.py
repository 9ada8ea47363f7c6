"""Replay one ring case and record everything the engine did, for comparing
the compiled engine with pure Python (tests/test_engine_equivalence.py).

A case is the input format of the atheris ring harness (`fuzz.targets.ring`):
a flags byte (packed, event_idx, indirect, eager, bulk), the queue size, the
start index, a batch limit, a ring image, then (offset, value) pairs the
driver scribbles into the rings between rounds. The trace holds, per round:
the chains handed out (id, position, slots, each view as guest offset and
length, the lengths), the name of any exception and the step that raised
it, a digest of guest memory (what the driver sees: used ring, event
areas, the bytes written into its buffers) and the counted accesses
(`CountingMemory.snapshot()`). Two engines that agree on every trace behave
the same on that case.

Run as a script (`python tests/engine_trace.py`), it is the worker: one hex
case a line on stdin, one JSON trace a line on stdout. The parent starts it
with PYVIRTIO_PURE=1 to get the pure engine's trace beside its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # fuzz/ (the worker runs as a script)

from fuzz.targets import (
    MAX_IMAGE,
    MAX_ROUNDS,
    RING_BASE,
    decode_ring_case,
)

from pyvirtio.queue import QueueError, Virtqueue


def _addr(v: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(v))


def _err(e: BaseException) -> list[Any]:
    # the class and, for a QueueError, the message (it names the step and the values)
    return [type(e).__name__, str(e) if isinstance(e, QueueError) else ""]


def trace(data: bytes) -> list[Any]:
    """Replay `data`; the list of events (JSON-able)."""
    out: list[Any] = []
    case = decode_ring_case(data)
    r, host, mv, raw, mem = case.r, case.host, case.mv, case.raw, case.mem
    packed, size, start, limit, bulk = case.packed, case.size, case.start, case.limit, case.bulk
    desc, drv, dev, features, policy, state = case.desc, case.drv, case.dev, case.features, case.policy, case.state
    out.append(["config", packed, size, start, limit, policy, bulk, features])
    try:
        vq = Virtqueue(mem, size, desc, drv, dev, features=features, policy=policy,  # type: ignore[arg-type]
                       state=state)
    except QueueError as e:
        out.append(["error", "init", *_err(e)])
        return out
    lo = _addr(mv)

    def view(v: memoryview) -> list[int]:
        return [_addr(v) - lo, len(v)]

    for rnd in range(MAX_ROUNDS):
        units: list[tuple[object, list[Any]]] = []
        try:
            got = vq.pop_bulk(limit) if bulk else vq.pop_batch(limit)
            if hasattr(got, "chains"):
                units = [(got, got.chains())]  # type: ignore[union-attr]
            else:
                units = [(c, [c]) for c in got]  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - recorded: both engines must raise the same
            out.append(["error", f"pop {rnd}", *_err(e)])
        for unit, chains in units:
            ws = []
            for c in chains:
                out.append(["chain", c.id, c.pos, c.slots, [view(v) for v in c.readable],
                            [view(v) for v in c.writable], c.readable_len, c.writable_len])
                ws.append(c.write(bytes([0xD7 ^ (c.id & 0xFF)]) * min(c.writable_len, 32)))
            try:
                if hasattr(unit, "chains"):
                    out.append(["bulk", list(unit.len_summary())])  # type: ignore[attr-defined]
                    # one length for all takes the int form (what a generator passes), else one each
                    w: Any = ws[0] if len(set(ws)) == 1 else np.array(ws, np.uint32)
                    vq.complete_bulk(unit, w)  # type: ignore[arg-type]
                else:
                    vq.complete(unit, ws[0])  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001
                out.append(["error", f"complete {rnd}", *_err(e)])
        for step in ("flush", "has_work", "arm"):
            try:
                res = getattr(vq, step)()
                out.append([step, str(res)])
            except Exception as e:  # noqa: BLE001
                out.append(["error", f"{step} {rnd}", *_err(e)])
        out.append(["memory", hashlib.sha1(mv).hexdigest(), mem.snapshot(), vq.in_flight, type(vq.failed).__name__, vq.stats.chains, vq.stats.completed, vq.stats.publishes, vq.stats.interrupts])
        if r.left() >= 4:
            off, value = r.u16(), r.u16()
            gpa = RING_BASE + off % (MAX_IMAGE - 1)
            raw.write(gpa, struct.pack("<H", value))
        elif not units:
            break
    try:
        vq.flush()
    except Exception as e:  # noqa: BLE001
        out.append(["error", "final flush", *_err(e)])
    out.append(["end", hashlib.sha1(host).hexdigest(), mem.snapshot(), vq.in_flight])
    return out


def trace_loop(data: bytes) -> list[Any]:
    """The same case served by the real queue loop over a ring with inflight
    tracking, as a vhost-user back-end serves it (`QueueLoop.step()`, a
    `TrackedVirtqueue`, a service that writes each chain and keeps every
    third one in flight): each step's decision, the loop's counters, guest
    memory and the inflight region after each round, then what a restarted
    back-end would resume from that region."""
    from pyvirtio.queue import QueueState
    from pyvirtio.runtime import QueueLoop, Service, Step
    from pyvirtio.vhost_user.inflight import PackedTracker, SplitTracker, TrackedVirtqueue, queue_region_size

    out: list[Any] = []
    case = decode_ring_case(data)
    r, mv, raw, mem, packed, size = case.r, case.mv, case.raw, case.mem, case.packed, case.size
    out.append(["config", packed, size, case.start, case.limit, case.policy, case.features])
    region = bytearray(queue_region_size(size, packed))

    def tracker() -> SplitTracker | PackedTracker:
        rv = memoryview(region)
        return PackedTracker(rv, size, mem, case.desc) if packed else SplitTracker(rv, size)

    default = case.state or QueueState(size, packed)
    calls: list[int] = []
    limit = case.limit

    class Keeper(Service):
        batch = limit

        def handle(self, chains: Any, done: list[Any]) -> None:
            for c in chains:
                out.append(["chain", c.id, c.pos, c.slots, c.readable_len, c.writable_len])
                w = c.write(bytes([0xD7 ^ (c.id & 0xFF)]) * min(c.writable_len, 32))
                if c.id % 3 == 2:
                    self.queue.defer()  # kept in flight for good
                else:
                    done.append((c, w))

    try:
        t = tracker()
        state = t.resume(default)
        vq = TrackedVirtqueue(mem, size, case.desc, case.drv, case.dev, features=case.features,
                              policy=case.policy, state=state, tracker=t)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - recorded: both engines must raise the same
        out.append(["error", "init", *_err(e)])
        return out
    loop = QueueLoop(vq, None, lambda: calls.append(1))
    loop.attach(Keeper)
    for rnd in range(MAX_ROUNDS):
        steps = []
        for _ in range(64):
            try:
                s = loop.step()
            except Exception as e:  # noqa: BLE001
                out.append(["error", f"step {rnd}", *_err(e)])
                break
            steps.append(s.name)
            if s is not Step.BUSY:
                loop.woke([])
                break
        out.append(["steps", steps, loop.counters.as_dict(), len(calls), loop.outstanding])
        out.append(["memory", hashlib.sha1(mv).hexdigest(), hashlib.sha1(region).hexdigest(), mem.snapshot(),
                    vq.in_flight, type(vq.failed).__name__, vq.stats.chains, vq.stats.completed])
        if r.left() >= 4:
            off, value = r.u16(), r.u16()
            gpa = RING_BASE + off % (MAX_IMAGE - 1)
            raw.write(gpa, struct.pack("<H", value))
        elif vq.failed is not None or not steps or steps == ["SLEEP"]:
            break
    # a back-end restarted now: what the region says was in flight
    try:
        again = tracker().resume(default)
        out.append(["resume", again.last_avail, again.used_idx, list(again.in_flight), again.avail_wrap,
                    again.used_wrap])
    except Exception as e:  # noqa: BLE001
        out.append(["error", "resume", *_err(e)])
    return out


def trace_blk(case: dict[str, Any]) -> list[Any]:
    """A batch of virtio-blk requests (`case`: see test_engine_equivalence's
    `blk_cases`) taken from a ring and given to the engine's blk batch
    operation (`pyvirtio.queue.blkreq.serve`) over a real image file: per
    chain what came back (the used length, or the parsed request: kind,
    offset, length, data as lengths and guest offsets, status offset), then
    the device's counts, the queue's counters and a digest of guest memory
    (the data reads brought in, the status bytes written)."""
    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.queue.blkreq import BlkRequest, serve
    from pyvirtio.runtime import QueueCounters
    from pyvirtio.testing import QueuePair

    out: list[Any] = []
    p = QueuePair("split", 256, indirect=True, mem_size=8 << 20)
    region = p.raw.region_at(p.pool.alloc(16))
    assert region is not None
    host0, gpa0 = region.host_addr, region.gpa

    def goff(host: int) -> int:  # a host address as a guest address (the same in both processes)
        return host - host0 + gpa0

    for rq in case["reqs"]:
        readable = []
        for chunk in rq["r"]:
            b = bytes.fromhex(chunk)
            g = p.pool.alloc(max(1, len(b)))
            p.raw.write(g, b)
            readable.append((g, len(b)))
        writable = []
        for n in rq["w"]:
            g = p.pool.alloc(max(1, n))
            p.raw.write(g, b"\xee" * n)
            writable.append((g, n))
        p.driver.add(readable, writable, indirect=rq["indirect"] or len(readable) + len(writable) > 200)
    p.driver.publish()
    chains = p.vq.pop_batch(len(case["reqs"]))
    out.append(["chains", [[type(c).__name__, c.readable_len, c.writable_len] for c in chains]])
    dev = BlkDevice(case["image"], read_only=case["ro"], io_threads=0, serial=case["serial"])
    try:
        counters = QueueCounters()
        done: list[Any] = []

        def view(v: memoryview) -> list[int]:
            return [goff(_addr(v)) if len(v) else -1, len(v)]

        def run(chain: Any, r: BlkRequest) -> None:
            iov = [] if r.iov is None else [[goff(a), n] for a, n in struct.iter_unpack("<QQ", r.iov)]
            out.append(["run", chain.id, r.kind, r.offset, r.nbytes, r.written, view(r.status),
                        [view(v) for v in r.data], iov, r.payload.hex()])

        serve(dev, counters, chains, done, run, case["cached"])
        out.append(["done", [[c.id, w] for c, w in done]])
        out.append(["counts", dev.counts.as_dict(), dev._nowait])
        out.append(["counters", counters.as_dict()])
    finally:
        dev.close()
    out.append(["memory", hashlib.sha256(p.raw.region_at(gpa0).mv).hexdigest()])  # type: ignore[union-attr]
    return out


def main() -> None:
    from pyvirtio import _engine

    print(json.dumps(_engine.name()), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("B"):
            print(json.dumps(trace_blk(json.loads(line[1:]))), flush=True)
            continue
        run = trace_loop if line.startswith("L") else trace
        print(json.dumps(run(bytes.fromhex(line.lstrip("L")))), flush=True)


if __name__ == "__main__":
    main()
