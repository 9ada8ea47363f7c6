"""`pyvirtio bench net`: packets per second through a vhost-user-net back-end,
driven by the Python front-end (`VhostUserFrontend`).

With a socket path it measures whatever back-end listens there (ours, DPDK's
`net_vhost`, ...). Without one it starts an embedded pyvirtio back-end in a
second process (`python -m pyvirtio net --socket-path TMP --backend sink`),
pinned to another CPU when there is one, and stops it by pid afterwards, so
it runs with nothing installed but the package.

The front-end transmits `batch` frames per `send` for `seconds`; if frames
come back (a loopback or forwarding back-end) it receives them too. Rates
count frames the back-end *completed* (tx) and frames delivered (rx).

Also home of `ManagedProcess` and `parse_last_json`, shared with
`pyvirtio.bench.dpdk`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from pyvirtio.driver.frontend import RX_QUEUE, TX_QUEUE, VhostUserFrontend, feature_names, make_frame

log = logging.getLogger(__name__)


# --- child processes ------------------------------------------------------------------------


class ManagedProcess:
    """A child process whose output goes to a file, stopped by pid.

    Started in its own session (a terminal's Ctrl-C does not reach it; we
    stop it ourselves). `stop()` sends `sig` (default SIGTERM), waits, then
    SIGKILLs; it is idempotent and safe in `finally` blocks. `cpu` pins the
    child (and the threads it starts later) to one CPU.
    """

    def __init__(self, argv: Sequence[str], name: str, *, cpu: int | None = None, log_dir: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        fd, self.log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=log_dir)
        self._out: TextIO = os.fdopen(fd, "w")

        log.debug("starting %s: %s", name, " ".join(self.argv))
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.pid = self.proc.pid
        if cpu is not None:
            # Pinned right after the fork: the few instructions it runs
            # unpinned do not matter, and no preexec_fn is needed.
            os.sched_setaffinity(self.pid, {cpu})
        self.returncode: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the child (by pid) if it still runs."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def output(self) -> str:
        """Everything the child printed so far (all of it once stopped)."""
        if not self._out.closed:
            self._out.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Stop the child and reap it; returns its exit status."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored signal %d; killing it", self.name, self.pid, sig)
                    self.send_signal(signal.SIGKILL)
                    self.proc.wait()
            self.returncode = self.proc.returncode
            self._out.close()
        return self.returncode

    def cleanup(self) -> None:
        """Stop if needed and delete the output file."""
        self.stop()
        try:
            os.unlink(self.log_path)
        except FileNotFoundError:
            pass


def parse_last_json(text: str) -> dict[str, Any] | None:
    """The last JSON object in `text` that starts at the beginning of a line
    (one-line or pretty-printed), or None."""
    dec = json.JSONDecoder()
    pos = len(text)
    while True:
        pos = text.rfind("{", 0, pos)
        if pos < 0:
            return None
        if pos == 0 or text[pos - 1] == "\n":
            try:
                obj, _ = dec.raw_decode(text, pos)
            except ValueError:
                pass
            else:
                if isinstance(obj, dict):
                    return obj


def backend_per_packet(stats: dict[str, Any] | None, mode: str) -> dict[str, float | None]:
    """Kicks, interrupts and guest-memory accesses per packet from a pyvirtio
    back-end's JSON counters (`queues` list with roles rx0/tx0).

    `mode` is the traffic direction seen from the front-end: "tx" counts the
    back-end's tx queue, "rx" its rx queue, "fwd" both queues' work divided
    by the packets forwarded. Missing data gives None fields.
    """
    out: dict[str, float | None] = {"kicks_per_packet": None, "interrupts_per_packet": None,
                                    "accesses_per_packet": None, "metadata_accesses_per_packet": None}
    if not stats or not isinstance(stats.get("queues"), list):
        return out
    queues = [q for q in stats["queues"] if isinstance(q, dict)]

    def role(q: dict[str, Any]) -> str:
        r = str(q.get("role", ""))
        if r.startswith(("rx", "tx")):
            return r[:2]
        idx = q.get("index")
        return ("rx", "tx")[idx % 2] if isinstance(idx, int) else ""

    want = {"tx": ("tx",), "rx": ("rx",), "fwd": ("rx", "tx")}[mode]
    sel = [q for q in queues if role(q) in want]
    if not sel:
        return out
    packets = sum(int(q.get("packets", 0)) for q in sel if role(q) == ("rx" if mode == "rx" else "tx"))
    if not packets:
        return out

    def total(key: str, sub: str | None = None) -> int | None:
        vals = []
        for q in sel:
            v = q.get(key)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(v)
        return int(sum(vals)) if vals else None

    for name, key, sub in (("kicks_per_packet", "kick_count", None), ("interrupts_per_packet", "interrupts", None),
                           ("accesses_per_packet", "accesses", "total"),
                           ("metadata_accesses_per_packet", "accesses", "metadata")):
        t = total(key, sub)
        out[name] = None if t is None else round(t / packets, 4)
    return out


def wait_for_socket(path: str, proc: ManagedProcess, timeout: float) -> None:
    """Wait until `path` exists; raise RuntimeError if `proc` dies first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}) before creating {path}:\n"
                               + proc.output()[-2000:])
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not create {path} within {timeout:g} s")
        time.sleep(0.02)


def pyvirtio_backend_argv(socket_path: str, backend: str, policy: str | None = None,
                          extra: Sequence[str] = ()) -> list[str]:
    """The command line of an embedded pyvirtio net back-end."""
    argv = [sys.executable, "-m", "pyvirtio", "net", "--socket-path", socket_path, "--backend", backend]
    if policy:
        argv += ["--policy", policy]
    return argv + list(extra)


# --- the benchmark ----------------------------------------------------------------------------


@dataclass(slots=True)
class NetBenchConfig:
    socket_path: str | None = None
    ring: str = "split"
    seconds: float = 5.0
    size: int = 64
    batch: int = 64
    queue_size: int = 256
    backend: str = "sink"   # embedded back-end only
    policy: str | None = None  # embedded back-end only
    event_idx: bool = False
    tx_segments: int = 1
    pin: bool = True        # embedded: back-end on CPU 0, this process on CPU 1


def _measure(fe: VhostUserFrontend, cfg: NetBenchConfig) -> dict[str, Any]:
    frames = [make_frame(cfg.size, i) for i in range(cfg.batch)]
    # Does anything come back? A handful of frames tell loopback from sink.
    fe.send(frames[:8])
    fe.flush(2.0)
    looped = fe.recv_count(0.5) > 0
    time.sleep(0.05)
    fe.recv_count(0)
    stats0 = dict(fe.stats)
    send = fe.send
    recv_count = fe.recv_count
    tx = rx = 0
    t0 = time.monotonic()
    end = t0 + cfg.seconds
    # Hot loop: one send per batch, a non-blocking receive when looping
    # back. With loopback, never have more frames in flight than receive
    # buffers, else the back-end drops what finds no buffer and the rate
    # measured is not one the path sustains.
    limit = cfg.queue_size - cfg.batch
    while time.monotonic() < end:
        if looped and tx - rx > limit:
            rx += recv_count(1.0)
            continue
        tx += send(frames, 1.0)
        if looped:
            rx += recv_count(0)
    fe.flush(2.0)
    elapsed = time.monotonic() - t0
    tx_done = tx - fe.tx_outstanding()
    if looped:
        drain_end = time.monotonic() + 0.5
        while rx < tx_done and time.monotonic() < drain_end:
            rx += recv_count(0.05)
    d = {k: fe.stats[k] - stats0[k] for k in fe.stats}
    return {
        "looped_back": looped,
        "seconds": round(elapsed, 3),
        "tx_packets": tx_done,
        "rx_packets": rx,
        "tx_pps": round(tx_done / elapsed),
        "rx_pps": round(rx / elapsed) if looped else None,
        "rx_lost": tx_done - rx if looped else None,
        "frontend_tx_kicks_per_packet": round(d["tx_kicks"] / tx_done, 4) if tx_done else None,
        "frontend_rx_kicks_per_packet": round(d["rx_kicks"] / rx, 4) if rx else None,
        "frontend_tx_full_waits": d["tx_full_waits"],
        "frontend_calls": d["tx_calls"] + d["rx_calls"],
    }


def run(cfg: NetBenchConfig) -> dict[str, Any]:
    """Run one measurement; returns a JSON-able result. Raises RuntimeError
    if the embedded back-end cannot start, `FrontendError` if the back-end
    misbehaves."""
    tmpdir = None
    proc: ManagedProcess | None = None
    old_affinity = os.sched_getaffinity(0)
    ncpu = len(old_affinity)
    path = cfg.socket_path
    result: dict[str, Any] = {"config": asdict(cfg)}
    try:
        if path is None:
            tmpdir = tempfile.mkdtemp(prefix="pyvirtio-bench-net-")
            path = os.path.join(tmpdir, "net.sock")
            cpus = sorted(old_affinity)
            pin_backend = cpus[0] if cfg.pin and ncpu >= 2 else None
            proc = ManagedProcess(pyvirtio_backend_argv(path, cfg.backend, cfg.policy), "pyvirtio-net",
                                  cpu=pin_backend, log_dir=tmpdir)
            wait_for_socket(path, proc, 15.0)
            if pin_backend is not None:
                os.sched_setaffinity(0, {cpus[1]})
            result["backend"] = {"kind": "embedded pyvirtio", "backend": cfg.backend, "pid": proc.pid,
                                 "cpu": pin_backend}
        else:
            result["backend"] = {"kind": "external", "socket_path": path}
        with VhostUserFrontend(path, packed=cfg.ring == "packed", queue_size=cfg.queue_size,
                               event_idx=cfg.event_idx, tx_segments=cfg.tx_segments,
                               connect_timeout=10.0) as fe:
            result["features"] = feature_names(fe.features or 0)
            result.update(_measure(fe, cfg))
            bases = fe.stop()
            result["vring_base"] = {"rx": bases[RX_QUEUE], "tx": bases[TX_QUEUE]}
        if proc is not None:
            proc.stop()
            counters = parse_last_json(proc.output())
            result["backend_counters"] = counters
            result.update({f"backend_{k}": v for k, v in
                           backend_per_packet(counters, "fwd" if result.get("looped_back") else "tx").items()})
        return result
    finally:
        os.sched_setaffinity(0, old_affinity)
        if proc is not None:
            proc.stop()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def format_result(r: dict[str, Any]) -> str:
    """A short human-readable summary of `run`'s result."""
    cfg = r["config"]
    b = r["backend"]
    who = b.get("socket_path") or f"embedded pyvirtio ({b.get('backend')}, pid {b.get('pid')})"
    lines = [(f"bench net: {cfg['ring']} ring, {cfg['size']}-byte frames, batch {cfg['batch']}, "
              f"{r['seconds']} s against {who}"),
             f"  tx: {r['tx_packets']} packets, {r['tx_pps']:,} pps"]
    if r.get("looped_back"):
        lines.append(f"  rx: {r['rx_packets']} packets, {r['rx_pps']:,} pps (lost {r['rx_lost']})")
    else:
        lines.append("  rx: nothing came back (sink)")
    lines.append(f"  front-end kicks/packet: tx {r['frontend_tx_kicks_per_packet']}, "
                 f"rx {r['frontend_rx_kicks_per_packet']}; ring-full waits {r['frontend_tx_full_waits']}")
    if "backend_counters" in r:
        lines.append(f"  back-end per packet: kicks {r.get('backend_kicks_per_packet')}, interrupts "
                     f"{r.get('backend_interrupts_per_packet')}, accesses {r.get('backend_accesses_per_packet')} "
                     f"(metadata {r.get('backend_metadata_accesses_per_packet')})")
    return "\n".join(lines)
