"""The compiled ring engine behaves exactly like pure Python (issue 12).

The same rings, valid and hostile, go to both engines: the compiled one in
this process, the pure one in a child process started with PYVIRTIO_PURE=1
(both cannot live in one process: they define the same classes). Each case
is replayed by `tests/engine_trace.py`, which records the chains handed out
(ids, positions, every view as guest offset and length), every exception
with the step that raised it (the same `QueueError` subclass and message on
the same step), the guest memory after each round (used ring, event areas
and the bytes written into buffers: what the driver sees) and the counted
accesses. The traces must be equal.

The queue loop and the inflight tracker are compiled with the engine: the
same cases also go through `QueueLoop.step()` over a `TrackedVirtqueue`
(`engine_trace.trace_loop`), recording each step's decision, the loop's
counters, the inflight region, and what a restarted back-end would resume.

Cases: the atheris seed corpus (valid rings made by the driver model, split
and packed, every feature combination), and hypothesis mutations of them:
other flags (event_idx, indirect, eager, bulk), other batch limits and
start indices, bytes of the ring image overwritten, and driver scribbles
between rounds (hostile rings). Skipped when the engine is not compiled
(nothing to compare).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine_trace  # tests/ is on sys.path (pytest's rootdir-relative import)
from pyvirtio import _engine

HERE = Path(__file__).resolve().parent
SEEDS = sorted((HERE.parent / "fuzz" / "corpus" / "ring").iterdir())
EXAMPLES = 1500

pytestmark = pytest.mark.skipif(not _engine.is_compiled(),
                                reason=f"the ring engine is not compiled ({_engine.name()}): "
                                       "nothing to compare with pure Python")


class PureWorker:
    """tests/engine_trace.py in a child process on the pure engine."""

    def __init__(self) -> None:
        env = {**os.environ, "PYVIRTIO_PURE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "engine_trace.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        self.engine = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the pure-engine worker died (exit {self.proc.poll()})"
        return json.loads(line)

    def trace(self, data: bytes, loop: bool = False) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(("L" if loop else "") + data.hex() + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def pure() -> Iterator[PureWorker]:
    w = PureWorker()
    try:
        assert w.engine == "pure (PYVIRTIO_PURE=1)", w.engine
        yield w
    finally:
        w.close()


@pytest.fixture(autouse=True)
def _quiet_retirements() -> Iterator[None]:
    logging.disable(logging.ERROR)  # every hostile case logs "queue retired"
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def compare(pure: PureWorker, data: bytes, loop: bool = False) -> list[Any]:
    run = engine_trace.trace_loop if loop else engine_trace.trace
    mine = json.loads(json.dumps(run(data)))  # the same JSON round trip as the child's
    theirs = pure.trace(data, loop)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a == b, f"event {i} differs (compiled vs pure): {a} != {b}\ncase {data.hex()}"
    assert len(mine) == len(theirs), f"compiled {len(mine)} events, pure {len(theirs)}\ncase {data.hex()}"
    return mine


def test_the_two_engines_really_differ(pure: PureWorker) -> None:
    assert _engine.name().startswith("mypyc")
    assert pure.engine.startswith("pure")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_seed_rings_give_the_same_trace(pure: PureWorker, seed: Path) -> None:
    compare(pure, seed.read_bytes())


@st.composite
def cases(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)).read_bytes())
    if draw(st.booleans()):
        # other features and modes; the ring layout (bit 0) kept
        data[0] = (draw(st.integers(0, 31)) & ~1) | (data[0] & 1)
    if draw(st.booleans()):
        data[4] = draw(st.integers(0, 255))  # batch limit
    if draw(st.integers(0, 3)) == 0:
        data[2:4] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "little")  # start index
    header = 7
    for _ in range(draw(st.integers(0, 6))):  # hostile ring image bytes
        if len(data) <= header:
            break
        pos = draw(st.integers(header, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        data[pos:pos + len(chunk)] = chunk
    # driver scribbles between rounds: (offset, value) u16 pairs
    data += draw(st.binary(max_size=4 * 8))
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=cases())
def test_mutated_rings_give_the_same_trace(pure: PureWorker, data: bytes) -> None:
    compare(pure, data)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=7, max_size=600))
def test_random_bytes_give_the_same_trace(pure: PureWorker, data: bytes) -> None:
    compare(pure, data)


# -- the queue loop and the inflight tracker (compiled with the engine) ---------------------


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_seed_rings_served_by_the_loop_give_the_same_trace(pure: PureWorker, seed: Path) -> None:
    events = compare(pure, seed.read_bytes(), loop=True)
    assert events[0][0] == "config" and events[-1][0] in ("resume", "error")


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=cases())
def test_mutated_rings_served_by_the_loop_give_the_same_trace(pure: PureWorker, data: bytes) -> None:
    compare(pure, data, loop=True)


# -- the blk batch operation (pyvirtio.queue.blkreq, compiled with the engine) ---------------

BLK_SECTORS = 64  # the image: 32 KiB of known bytes


@pytest.fixture(scope="module")
def blk_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("blk") / "disk.img"
    path.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(BLK_SECTORS * 512)))
    return str(path)


@st.composite
def blk_requests(draw: st.DrawFn) -> dict[str, Any]:
    """One request as the driver lays it out: the readable buffers' bytes
    (the header, whole, split or short, then any payload), the writable
    buffers' lengths (data, the status byte last, alone or sharing)."""
    typ = draw(st.sampled_from([0, 0, 0, 1, 1, 4, 8, 11, 13, 2, 10, 14, 0xFFFFFFFF]))
    sector = draw(st.one_of(st.integers(0, BLK_SECTORS - 9), st.integers(0, BLK_SECTORS + 2), st.integers(0, 2**64 - 1)))
    hdr = struct.pack("<IIQ", typ, draw(st.sampled_from([0, 0, 1])), sector)
    if draw(st.integers(0, 9)) == 0:
        hdr = hdr[:draw(st.integers(0, 15))]  # short header
    cut = draw(st.integers(0, 3))
    r = [hdr[:cut * 4], hdr[cut * 4:]] if cut else [hdr]
    w: list[int] = []
    nseg = draw(st.sampled_from([0, 1, 2, 3, 40]))  # 40: a long indirect table (IovChain)
    seglen = draw(st.sampled_from([512, 1024, 4096, 100, 0]))
    if typ == 1:
        for _ in range(nseg):
            r.append(draw(st.binary(min_size=seglen, max_size=seglen)))
    elif typ in (11, 13):
        for _ in range(draw(st.integers(0, 3))):
            r.append(struct.pack("<QII", draw(st.integers(0, BLK_SECTORS + 1)), draw(st.integers(0, 8)),
                                 draw(st.sampled_from([0, 0, 1, 2]))))
    else:
        w = [seglen] * nseg
    if draw(st.integers(0, 9)):  # else: no writable byte at all
        if w and draw(st.booleans()):
            w[-1] += 1  # the status shares the last data buffer
        else:
            w.append(draw(st.sampled_from([1, 1, 3])))
    return {"r": [b.hex() for b in r], "w": w, "indirect": draw(st.booleans()) or nseg >= 40}


@st.composite
def blk_cases(draw: st.DrawFn) -> dict[str, Any]:
    return {"ro": draw(st.booleans()), "cached": draw(st.booleans()), "serial": draw(st.sampled_from(["s", "x" * 25])),
            "reqs": draw(st.lists(blk_requests(), min_size=1, max_size=6))}


def compare_blk(pure: PureWorker, case: dict[str, Any]) -> list[Any]:
    mine = json.loads(json.dumps(engine_trace.trace_blk(case)))
    assert pure.proc.stdin is not None
    pure.proc.stdin.write("B" + json.dumps(case) + "\n")
    pure.proc.stdin.flush()
    theirs = pure._read()
    assert mine == theirs, f"compiled vs pure:\n{mine}\n{theirs}\ncase {case}"
    return mine


@settings(max_examples=EXAMPLES // 5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=blk_cases())
def test_blk_requests_get_the_same_answers(pure: PureWorker, blk_image: str, case: dict[str, Any]) -> None:
    case["image"] = blk_image
    events = compare_blk(pure, case)
    assert events[0][0] == "chains" and events[-1][0] == "memory"
