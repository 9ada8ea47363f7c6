"""virtio-rng over vhost-user: `pyvirtio rng` as a child process, driven by
the small front-end of tests/vhost_client.py (memfd guest memory, the
driver model): the guest's buffers get the source's bytes in order, odd
chains are answered with 0 and the queue keeps working, a slow source is
answered short instead of hanging, the rate limit holds."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_client import NetFrontend

KiB = 1 << 10


@contextlib.contextmanager
def rng_backend(tmp_path: Path, source: Path, *extra: str) -> Iterator[Path]:
    """`pyvirtio rng` on a socket in `tmp_path`; stopped by pid (SIGTERM), must exit 0."""
    sock = tmp_path / "rng.sock"
    log = open(tmp_path / "rng.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "-v", "rng", "--socket-path", str(sock),
                             "--source", str(source), *extra], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (tmp_path / "rng.log").read_text()
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.02)
        yield sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        log.close()
    assert rc == 0, (tmp_path / "rng.log").read_text()


@contextlib.contextmanager
def frontend(sock: Path, packed: bool = False) -> Iterator[NetFrontend]:
    fe = NetFrontend(str(sock), packed=packed)
    try:
        fe.negotiate()
        fe.setup_ring(0)
        yield fe
    finally:
        fe.close()


def post(fe: NetFrontend, chains: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Post chains of (readable lengths, writable lengths); returns the
    writable buffers' gpas of each chain (its token is its index)."""
    ring = fe.rings[0]
    gpas = []
    for i, (outs, ins) in enumerate(chains):
        out = []
        for n in outs:
            g = fe.pool.alloc(n)
            fe.mem.mem.write(g, b"\xaa" * n)
            out.append((g, n))
        inn = [(fe.pool.alloc(n) if n else fe.pool.alloc(1), n) for n in ins]
        ring.driver.add(out, inn, i)
        gpas.append([g for g, _ in inn])
    if ring.driver.publish():
        fe.kick(0)
    return gpas


def answers(fe: NetFrontend, chains: list[tuple[list[int], list[int]]], timeout: float = 10.0) -> list[bytes]:
    """Post `chains`, wait for all of them; the bytes the device wrote into each."""
    gpas = post(fe, chains)
    used = fe.reap(0, len(chains), timeout)
    assert len(used) == len(chains)
    got: dict[int, bytes] = {}
    for tok, n in used:
        assert isinstance(tok, int)
        data = b"".join(fe.mem.mem.read(g, ln) for g, ln in zip(gpas[tok], chains[tok][1]))
        assert n <= len(data)
        got[tok] = data[:n]
    return [got[i] for i in range(len(chains))]


def into(*lengths: int) -> tuple[list[int], list[int]]:
    """A request of device-writable buffers only, of these lengths."""
    return [], list(lengths)


@pytest.fixture
def pattern(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(15).randbytes(256 * KiB)
    p = tmp_path / "source.bin"
    p.write_bytes(data)
    return p, data


def test_print_capabilities_names_the_vhost_user_rng_type() -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirtio", "rng", "--print-capabilities"],
                         capture_output=True, text=True, check=True).stdout
    assert out == '{"type": "rng"}\n'


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_buffers_get_the_source_bytes_in_order(tmp_path: Path, pattern: tuple[Path, bytes],
                                                     packed: bool) -> None:
    source, data = pattern
    chains = [into(64)] * 8 + [into(100, 1, 4000), into(4096), into(7, 9)] + [into(64)] * 20
    with rng_backend(tmp_path, source) as sock, frontend(sock, packed) as fe:
        got = answers(fe, chains)
    assert [len(g) for g in got] == [sum(ins) for _, ins in chains]
    assert b"".join(got) == data[:sum(len(g) for g in got)]


def test_chain_without_writable_bytes_is_answered_zero_and_the_queue_keeps_working(
        tmp_path: Path, pattern: tuple[Path, bytes]) -> None:
    source, data = pattern
    with rng_backend(tmp_path, source) as sock, frontend(sock) as fe:
        got = answers(fe, [([16], []), ([], [0]), ([32], [0]), ([], [64])])
        assert got == [b"", b"", b"", data[:64]]  # nothing was consumed for the empty ones
        assert answers(fe, [([8], [64])]) == [data[64:128]]  # readable bytes before writable ones are ignored


def test_source_at_its_end_is_answered_short_then_with_zero(tmp_path: Path) -> None:
    source = tmp_path / "short.bin"
    source.write_bytes(bytes(range(100)))
    with rng_backend(tmp_path, source) as sock, frontend(sock) as fe:
        assert answers(fe, [([], [64]), ([], [64]), ([], [64])]) == [bytes(range(64)), bytes(range(64, 100)), b""]
        assert answers(fe, [([], [64])]) == [b""]


def test_slow_source_is_answered_with_what_it_has_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    with rng_backend(tmp_path, fifo, "--max-wait", "0.3") as sock, frontend(sock) as fe:
        w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the back-end holds the read end
        try:
            t0 = time.monotonic()
            assert answers(fe, [([], [64])]) == [b""]  # nothing in the FIFO: 0 bytes after --max-wait
            waited = time.monotonic() - t0
            os.write(w, b"0123456789")
            assert answers(fe, [([], [64])]) == [b"0123456789"]  # fewer bytes than asked, at once
            post(fe, [([], [64])])  # the device waits for the source...
            time.sleep(0.1)
            os.write(w, b"late")  # ...and answers when it has bytes
            assert [n for _, n in fe.reap(0, 1)] == [4]
        finally:
            os.close(w)
    assert 0.25 < waited < 5


def test_rate_limit_spreads_the_bytes_over_time(tmp_path: Path, pattern: tuple[Path, bytes]) -> None:
    source, data = pattern
    rate = 8 * KiB
    with rng_backend(tmp_path, source, "--max-bytes-per-second", str(rate)) as sock, frontend(sock) as fe:
        t0 = time.monotonic()
        got = answers(fe, [([], [1024])] * 16)  # one second of burst, then 8 KiB at 8 KiB/s
        elapsed = time.monotonic() - t0
    assert b"".join(got) == data[:16 * KiB]
    assert 0.9 < elapsed < 5, elapsed


def test_counters_are_printed_at_exit(tmp_path: Path, pattern: tuple[Path, bytes]) -> None:
    source, _ = pattern
    stats = tmp_path / "stats.jsonl"
    with rng_backend(tmp_path, source, "--stats-file", str(stats)) as sock, frontend(sock) as fe:
        answers(fe, [([], [64])] * 5)
    last = json.loads(stats.read_text().splitlines()[-1])
    assert last["event"] == "exit"
    assert sum(q["packets"] for q in last["queues"]) == 5


def test_inherited_listening_socket_is_served_with_fd(tmp_path: Path, pattern: tuple[Path, bytes]) -> None:
    source, data = pattern
    sock = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    fd = listener.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "rng", "--fd", str(fd), "--source", str(source)],
                            pass_fds=(fd,))
    listener.close()
    try:
        with frontend(sock) as fe:
            assert answers(fe, [([], [64])]) == [data[:64]]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_readme_shows_the_rng_device_class_as_it_is() -> None:
    repo = Path(__file__).resolve().parents[1]
    code = (repo / "src/pyvirtio/devices/rng.py").read_text()
    cls = code[code.index("class RngDevice"):code.index("class _TokenBucket")].rstrip() + "\n"
    readme = (repo / "README.md").read_text()
    assert f"## Writing a device: virtio-rng in {len(cls.splitlines())} lines" in readme
    assert f"```python\n{cls}```" in readme
