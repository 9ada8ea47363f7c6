"""`pyvirtio bench queue`: the device engine against the Python driver.

Counts every guest-memory access the *device* makes (the driver's memory is
not counted) and reports accesses per request, kicks, interrupts and
throughput. Single-process mode runs the two sides in lock step, every batch
ending with the device going to sleep (arm, fence, re-check): the scenario
whose access count is exactly derivable. `--two-process` runs the driver in
another process with real eventfds: kicks, interrupts and lost wake-ups are
real there.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import time
from dataclasses import dataclass
from typing import Any, cast

from pyvirtio.driver import BufferPool, PackedDriver, SplitDriver, ring_layout
from pyvirtio.memory import CountingMemory, GuestMemory
from pyvirtio.queue import Virtqueue
from pyvirtio.queue.bulk import Bulk
from pyvirtio.runtime import Completion, Kick, Queue, QueueLoop, Service, Step, eventfd_call
from pyvirtio.spec import Feature

PAYLOAD = 64


@dataclass(slots=True)
class QueueBenchConfig:
    ring: str = "split"
    policy: str = "lazy"
    batch: int = 32
    requests: int = 200_000
    event_idx: bool = True
    queue_size: int = 256
    two_process: bool = False
    indirect: bool = False
    segments: int = 1
    bulk: bool = True


def _features(cfg: QueueBenchConfig) -> int:
    f = int(Feature.VERSION_1)
    if cfg.ring == "packed":
        f |= Feature.RING_PACKED
    if cfg.event_idx:
        f |= Feature.RING_EVENT_IDX
    if cfg.indirect:
        f |= Feature.RING_INDIRECT_DESC
    return f


class _Setup:
    """Guest memory with a ring and payload buffers, both sides attached."""

    def __init__(self, cfg: QueueBenchConfig) -> None:
        q = cfg.queue_size
        packed = cfg.ring == "packed"
        ring_bytes = 64 * 1024 + 32 * q
        data = q * cfg.segments * PAYLOAD + 64 * 1024
        self.mem = GuestMemory.anonymous(((ring_bytes + data) | 0xFFFF) + 1)
        desc, drv, dev, end = ring_layout(packed, q, 0)
        self.ring_addrs = (desc, drv, dev)
        self.pool = BufferPool(self.mem, end + 4096, data + 32 * 1024)
        cls = PackedDriver if packed else SplitDriver
        self.driver = cls(self.mem, q, desc, drv, dev, event_idx=cfg.event_idx,
                          indirect=cfg.indirect, pool=self.pool)
        self.buffers = [[self.pool.alloc(PAYLOAD) for _ in range(cfg.segments)] for _ in range(q)]

    def device(self, cfg: QueueBenchConfig, mem: GuestMemory) -> Virtqueue:
        desc, drv, dev = self.ring_addrs
        return Virtqueue(mem, cfg.queue_size, desc, drv, dev, features=_features(cfg),
                         policy=cfg.policy, name="bench")  # type: ignore[arg-type]


class _CompleteAll(Service):
    """The bench's device: every request completed at once, 0 bytes written."""

    eager_each = True  # the eager baseline: a publication and a decision per request

    def __init__(self, queue: Queue, batch: int, bulk: bool) -> None:
        super().__init__(queue)
        self.batch = batch
        self.bulk = bulk
        self.first = 0.0
        self.last = 0.0
        self.completed = 0

    def take(self) -> int:
        return self.batch

    def handle(self, chains: Any, done: list[Completion]) -> None:
        if not self.first:
            self.first = time.perf_counter()
        if type(chains) is Bulk:
            self.completed += chains.n
            done.append((chains, 0))
        else:
            self.completed += len(chains)
            done.extend([(c, 0) for c in chains])
        self.last = time.perf_counter()


def _result(cfg: QueueBenchConfig, cmem: CountingMemory, vq: Virtqueue, kicks: int, interrupts: int,
            elapsed: float, completed: int, lost: int) -> dict[str, Any]:
    snap = cmem.snapshot()
    areas = snap["areas"]
    assert isinstance(areas, dict)
    meta_r = int(snap["metadata_reads"])  # type: ignore[call-overload]
    meta_w = int(snap["metadata_writes"])  # type: ignore[call-overload]
    n = max(completed, 1)
    return {
        "ring": cfg.ring,
        "policy": cfg.policy,
        "batch": cfg.batch,
        "requests": completed,
        "event_idx": cfg.event_idx,
        "two_process": cfg.two_process,
        "queue_size": cfg.queue_size,
        "device_reads": meta_r,
        "device_writes": meta_w,
        "device_bytes_read": snap["metadata_bytes_read"],
        "device_bytes_written": snap["metadata_bytes_written"],
        "fences": snap["fences"],
        "accesses_per_request": round((meta_r + meta_w) / n, 4),
        "reads_per_request": round(meta_r / n, 4),
        "writes_per_request": round(meta_w / n, 4),
        "fences_per_request": round(int(snap["fences"]) / n, 4),  # type: ignore[call-overload]
        "kicks": kicks,
        "interrupts": interrupts,
        "kicks_per_request": round(kicks / n, 4),
        "interrupts_per_request": round(interrupts / n, 4),
        "arms": vq.stats.arms,
        "rearm_hits": vq.stats.rearm_hits,
        "suppressions": vq.stats.suppressions,
        "lost": lost,
        "seconds": round(elapsed, 4),
        "requests_per_s": round(completed / elapsed) if elapsed > 0 else 0,
        "areas": {k: {"reads": v["reads"], "writes": v["writes"],
                      "per_request": round((v["reads"] + v["writes"]) / n, 4)}
                  for k, v in areas.items() if k != "payload"},
    }


def run_single(cfg: QueueBenchConfig) -> dict[str, Any]:
    """Lock-step driver and device in one process: the device is the
    runtime's `QueueLoop` (the loop every device runs), stepped until it
    decides to sleep."""
    s = _Setup(cfg)
    cmem = CountingMemory(s.mem)
    vq = s.device(cfg, cmem)
    interrupts = [0]

    def call() -> None:
        interrupts[0] += 1

    loop = QueueLoop(vq, None, call)
    loop.attach(lambda q: _CompleteAll(q, max(cfg.batch, 1), cfg.bulk))
    step = loop.step
    drv = s.driver
    kicks = completed = 0
    device_time = 0.0
    segs = cfg.segments
    bufs = s.buffers
    t0 = time.perf_counter()
    remaining = cfg.requests
    try:
        while remaining:
            k = min(cfg.batch, remaining)
            for i in range(k):
                b = bufs[i]
                drv.add([(a, PAYLOAD) for a in b] if segs > 1 else [(b[0], PAYLOAD)], [], i)
            drv.enable_interrupts()
            if drv.publish():
                kicks += 1
            # device: drain, publish, go back to sleep (arm, fence, re-check)
            t = time.perf_counter()
            while step() is Step.BUSY:
                pass
            loop.woke()
            device_time += time.perf_counter() - t
            got = drv.get_used()
            completed += len(got)
            remaining -= len(got)
            if len(got) != k:
                raise RuntimeError(f"lost requests: {k} posted, {len(got)} completed")
    finally:
        loop.close()
    elapsed = time.perf_counter() - t0
    res = _result(cfg, cmem, vq, kicks, interrupts[0], elapsed, completed, cfg.requests - completed)
    res["device_busy_s"] = round(device_time, 4)
    res["device_requests_per_s"] = round(completed / device_time) if device_time else 0
    return res


def _driver_process(s: _Setup, cfg: QueueBenchConfig, kick_fd: int, call_fd: int, stop_fd: int,
                    conn: Any) -> None:
    """Keep the ring busy: post in batches, kick when asked, sleep on interrupts."""
    drv = s.driver
    os.set_blocking(call_fd, False)
    poller = select.poll()
    poller.register(call_fd, select.POLLIN)
    posted = done = kicks = waits = 0
    seen = bytearray(cfg.requests)
    dupes = 0
    segs = cfg.segments
    bufs = s.buffers
    free = list(range(cfg.queue_size))
    deadline = time.monotonic() + 600
    while done < cfg.requests and time.monotonic() < deadline:
        k = min(cfg.batch, cfg.requests - posted, len(free))
        if k:
            for _ in range(k):
                slot = free.pop()
                b = bufs[slot]
                drv.add([(a, PAYLOAD) for a in b] if segs > 1 else [(b[0], PAYLOAD)], [], (posted, slot))
                posted += 1
            if drv.publish():
                kicks += 1
                os.eventfd_write(kick_fd, 1)
        got = drv.get_used()
        for tok, _ in got:
            rid, rslot = cast("tuple[int, int]", tok)
            if seen[rid]:
                dupes += 1
            seen[rid] = 1
            free.append(rslot)
        done += len(got)
        if not got and (not free or posted == cfg.requests):
            # nothing to post and nothing back: sleep until an interrupt
            if drv.enable_interrupts():
                continue
            waits += 1
            poller.poll(1000)
            try:
                os.eventfd_read(call_fd)
            except BlockingIOError:
                pass
            drv.disable_interrupts()
    os.eventfd_write(stop_fd, 1)
    os.eventfd_write(kick_fd, 1)  # wake the device so it sees the stop
    conn.send({"done": done, "kicks": kicks, "waits": waits, "dupes": dupes,
               "missing": cfg.requests - sum(seen)})
    conn.close()


def run_two_process(cfg: QueueBenchConfig) -> dict[str, Any]:
    """Driver in a forked process, device here; real eventfds for kicks and interrupts."""
    s = _Setup(cfg)
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    stop_fd = os.eventfd(0, os.EFD_NONBLOCK)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    cmem = CountingMemory(s.mem)
    vq = s.device(cfg, cmem)
    loop = QueueLoop(vq, Kick(kick_fd), eventfd_call(call_fd))
    svc = loop.attach(lambda q: _CompleteAll(q, max(cfg.batch, 64), cfg.bulk))
    assert isinstance(svc, _CompleteAll)
    stopped = [False]

    def stop() -> bool:
        if not stopped[0]:
            try:
                os.eventfd_read(stop_fd)
                stopped[0] = True
            except BlockingIOError:
                pass
        return stopped[0]

    proc = ctx.Process(target=_driver_process, args=(s, cfg, kick_fd, call_fd, stop_fd, child), daemon=True)
    proc.start()
    try:
        loop.run(stop=stop)
        report = parent.recv() if parent.poll(30) else {"done": 0, "kicks": 0, "missing": cfg.requests}
    finally:
        loop.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        for fd in (kick_fd, call_fd, stop_fd):
            os.close(fd)
    c = loop.counters
    elapsed = (svc.last - svc.first) or 1e-9
    res = _result(cfg, cmem, vq, report["kicks"], c.interrupts, elapsed, svc.completed,
                  int(report["missing"]))
    busy = max(elapsed - c.sleep_us / 1e6, 1e-9)
    res["device_busy_s"] = round(busy, 4)
    # what the device side sustains while it has work (excludes its sleeps
    # waiting for the driver, which runs in Python too)
    res["device_requests_per_s"] = round(svc.completed / busy)
    res["device_wakeups"] = c.kicks
    res["device_sleeps"] = c.sleeps
    res["driver_waits"] = report.get("waits", 0)
    res["duplicates"] = report.get("dupes", 0)
    return res


def run(cfg: QueueBenchConfig) -> dict[str, Any]:
    return run_two_process(cfg) if cfg.two_process else run_single(cfg)


def format_table(results: list[dict[str, Any]]) -> str:
    cols = [("ring", "ring"), ("policy", "policy"), ("batch", "batch"), ("event_idx", "evidx"),
            ("requests", "requests"), ("accesses_per_request", "acc/req"), ("reads_per_request", "R/req"),
            ("writes_per_request", "W/req"), ("fences_per_request", "fence/req"),
            ("kicks_per_request", "kick/req"), ("interrupts_per_request", "irq/req"),
            ("requests_per_s", "req/s"), ("device_requests_per_s", "dev req/s"), ("lost", "lost")]
    rows = [[h for _, h in cols]] + [[str(r[k]) for k, _ in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    out = "\n".join(lines)
    for r in results:
        parts = ", ".join(f"{k} {v['per_request']}" for k, v in r["areas"].items() if v["per_request"])
        out += f"\n  {r['ring']}/{r['policy']}: per-area accesses per request: {parts}"
    return out
