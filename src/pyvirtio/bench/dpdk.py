"""`pyvirtio bench dpdk`: DPDK's virtio-user PMD (in testpmd) as the
front-end, against a pyvirtio back-end and against DPDK's own `net_vhost`
back-end, in the same run, with the same flags and CPUs.

Per run two processes: the back-end on CPU `cpus[0]`, the front-end testpmd
on CPU `cpus[1]` (testpmd's main and forwarding lcores share its CPU:
`--lcores 0@C,1@C`; testpmd refuses to run with one lcore, and the main lcore
sleeps between stats prints). Modes, as seen from the front-end:

| mode | front-end testpmd | pyvirtio back-end | DPDK back-end (testpmd net_vhost) |
|---|---|---|---|
| tx  | txonly               | `--backend sink`     | rxonly |
| rx  | rxonly               | `--backend gen:SIZE` | txonly |
| fwd | io, `--tx-first`     | `--backend loopback` | io (port looped to itself) |

The rate is the front-end's (Tx-pps for tx, Rx-pps otherwise): the mean of
testpmd's per-second "Throughput (since last show)" samples after a warm-up.
For pyvirtio the back-end's JSON counters (printed at exit) give kicks,
interrupts and guest-memory accesses per packet.

With `--rounds N` every target runs N times in turns; the table adds each
target's median, the ratio of the medians and each round's own ratio.

When the ring engine is compiled, each pyvirtio run is made twice, on the
compiled engine (`pyvirtio-lazy`) and on pure Python (`pyvirtio-lazy-pure`,
PYVIRTIO_PURE=1), so the table shows what compiling bought (`engines`).

Every process started is stopped by pid (SIGTERM, then SIGKILL), also on
errors and Ctrl-C; file prefixes and socket paths are unique per run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from pyvirtio._engine import PURE_ENV
from pyvirtio.bench.net import (
    ManagedProcess,
    backend_per_packet,
    parse_last_json,
    pyvirtio_backend_argv,
    wait_for_socket,
)

log = logging.getLogger(__name__)

TESTPMD = "dpdk-testpmd"
PMD_DIR = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0"
DPDK_RUNTIME_DIR = "/var/run/dpdk"

_FRONTEND_FWD = {"tx": "txonly", "rx": "rxonly", "fwd": "io"}
_DPDK_BACKEND_FWD = {"tx": "rxonly", "rx": "txonly", "fwd": "io"}
_PYVIRTIO_BACKEND = {"tx": "sink", "rx": "gen:{size}", "fwd": "loopback"}

_RX_PPS = re.compile(r"Rx-pps:\s+(\d+)")
_TX_PPS = re.compile(r"Tx-pps:\s+(\d+)")
_RX_PKTS = re.compile(r"RX-packets:\s+(\d+)")
_TX_PKTS = re.compile(r"TX-packets:\s+(\d+)")
_STATS_BLOCK = "NIC statistics for port"


@dataclass(slots=True)
class DpdkBenchConfig:
    mode: str = "tx"
    ring: str = "split"
    seconds: float = 5.0
    policies: tuple[str, ...] = ("lazy",)
    size: int = 64
    cpus: tuple[int, int] = (0, 1)   # back-end CPU, front-end CPU
    targets: tuple[str, ...] = ("pyvirtio", "dpdk")
    in_order: int | None = None      # virtio-user devargs; None = PMD default
    mrg_rxbuf: int | None = None
    queue_size: int | None = None
    warmup: float = 2.0
    startup_timeout: float = 30.0
    keep_logs: bool = False
    #: ring engines of the pyvirtio back-end: "compiled" and/or "pure"
    engines: tuple[str, ...] = ("compiled",)
    #: run every target this many times, in turns (a shared machine's
    #: speed drifts: the medians and each round's own ratio are reported)
    rounds: int = 1


def pmd_command(cpu: int, prefix: str, vdev: str, fwd_mode: str, extra: list[str] | None = None) -> list[str]:
    """A non-interactive testpmd on one CPU: runs until SIGTERM, printing
    port statistics every second."""
    return [TESTPMD, "--lcores", f"0@{cpu},1@{cpu}", "-d", PMD_DIR, "--no-pci", "--no-huge", "-m", "1024",
            "--file-prefix", prefix, "--vdev", vdev, "--",
            "--total-num-mbufs=16384", "--stats-period=1", "--disable-link-check",
            f"--forward-mode={fwd_mode}", "--port-topology=loop", *(extra or [])]


def virtio_user_vdev(sock: str, cfg: DpdkBenchConfig) -> str:
    vdev = f"net_virtio_user0,path={sock},queues=1,packed_vq={1 if cfg.ring == 'packed' else 0}"
    if cfg.in_order is not None:
        vdev += f",in_order={cfg.in_order}"
    if cfg.mrg_rxbuf is not None:
        vdev += f",mrg_rxbuf={cfg.mrg_rxbuf}"
    if cfg.queue_size is not None:
        vdev += f",queue_size={cfg.queue_size}"
    return vdev


def parse_rates(text: str) -> dict[str, list[int]]:
    """Per-block samples from testpmd's periodic stats: rx_pps, tx_pps and
    the cumulative rx_packets, tx_packets (one entry per stats block)."""
    out: dict[str, list[int]] = {"rx_pps": [], "tx_pps": [], "rx_packets": [], "tx_packets": []}
    for block in text.split(_STATS_BLOCK)[1:]:
        for key, rx in (("rx_pps", _RX_PPS), ("tx_pps", _TX_PPS), ("rx_packets", _RX_PKTS),
                        ("tx_packets", _TX_PKTS)):
            m = rx.search(block)
            if m:
                out[key].append(int(m.group(1)))
    return out


def _mean(xs: list[int]) -> int | None:
    return round(statistics.fmean(xs)) if xs else None


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while running so `finally` blocks stop
    the children (main thread only; elsewhere a no-op)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_exit)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Run:
    """One back-end/front-end pair: start, measure, stop."""

    def __init__(self, cfg: DpdkBenchConfig, label: str, workdir: str, seq: int) -> None:
        self.cfg = cfg
        self.label = label
        self.workdir = workdir
        self.prefix = f"pyvirtio-bench-{os.getpid()}-{seq}"
        self.sock = os.path.join(workdir, f"{seq}.sock")
        self.procs: list[ManagedProcess] = []
        self.prefixes: list[str] = []

    def start_testpmd(self, name: str, cpu: int, vdev: str, fwd: str, extra: list[str]) -> ManagedProcess:
        prefix = f"{self.prefix}-{name}"
        self.prefixes.append(prefix)
        p = ManagedProcess(pmd_command(cpu, prefix, vdev, fwd, extra), f"{self.label}-{name}", log_dir=self.workdir)
        self.procs.append(p)
        return p

    def wait_for_stats(self, p: ManagedProcess) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        while _STATS_BLOCK not in p.output():
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.proc.returncode}):\n{p.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} printed no statistics within {self.cfg.startup_timeout:g} s")
            time.sleep(0.1)

    def cleanup(self) -> None:
        # front-end first (it is the last started), then the back-end
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # keep stopping the others
                log.exception("stopping %s (pid %d) failed", p.name, p.pid)
        for prefix in self.prefixes:
            shutil.rmtree(os.path.join(DPDK_RUNTIME_DIR, prefix), ignore_errors=True)

    def measure(self, backend: ManagedProcess, backend_is_testpmd: bool) -> dict[str, Any]:
        cfg = self.cfg
        mode = cfg.mode
        extra = [f"--txpkts={cfg.size}"] if mode == "tx" else []
        if mode == "fwd":
            extra.append("--tx-first")
        front = self.start_testpmd("virtio-user", cfg.cpus[1], virtio_user_vdev(self.sock, cfg),
                                   _FRONTEND_FWD[mode], extra)
        self.wait_for_stats(front)
        time.sleep(cfg.warmup)
        f0 = len(front.output())
        b0 = len(backend.output()) if backend_is_testpmd else 0
        t0 = time.monotonic()
        end = t0 + cfg.seconds
        while time.monotonic() < end:
            if not front.alive() or not backend.alive():
                dead = front if not front.alive() else backend
                raise RuntimeError(f"{dead.name} exited during the measurement:\n{dead.output()[-3000:]}")
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        fs = parse_rates(front.output()[f0:])
        res: dict[str, Any] = {
            "label": self.label,
            "samples": len(fs["rx_pps"]),
            "frontend_rx_pps": _mean(fs["rx_pps"]),
            "frontend_tx_pps": _mean(fs["tx_pps"]),
        }
        res["pps"] = res["frontend_tx_pps"] if mode == "tx" else res["frontend_rx_pps"]
        if backend_is_testpmd:
            bs = parse_rates(backend.output()[b0:])
            res["backend_rx_pps"] = _mean(bs["rx_pps"])
            res["backend_tx_pps"] = _mean(bs["tx_pps"])
        front.stop()
        res["frontend_exit"] = front.returncode
        return res

    def run_dpdk(self) -> dict[str, Any]:
        cfg = self.cfg
        extra = [f"--txpkts={cfg.size}"] if cfg.mode == "rx" else []
        backend = self.start_testpmd("net_vhost", cfg.cpus[0], f"net_vhost0,iface={self.sock},queues=1",
                                     _DPDK_BACKEND_FWD[cfg.mode], extra)
        wait_for_socket(self.sock, backend, cfg.startup_timeout)
        res = self.measure(backend, True)
        backend.stop()
        res["backend_exit"] = backend.returncode
        return res

    def run_pyvirtio(self, policy: str, engine: str = "compiled") -> dict[str, Any]:
        cfg = self.cfg
        kind = _PYVIRTIO_BACKEND[cfg.mode].format(size=cfg.size)
        env = dict(os.environ)
        if engine == "pure":
            env[PURE_ENV] = "1"
        else:
            env.pop(PURE_ENV, None)
        backend = ManagedProcess(pyvirtio_backend_argv(self.sock, kind, policy), f"{self.label}-backend",
                                 cpu=cfg.cpus[0], log_dir=self.workdir, env=env)
        self.procs.append(backend)
        wait_for_socket(self.sock, backend, cfg.startup_timeout)
        res = self.measure(backend, False)
        res["backend_exit"] = backend.stop()
        counters = parse_last_json(backend.output())
        res["backend_counters"] = counters
        res.update(backend_per_packet(counters, cfg.mode))
        if counters is None:
            log.warning("the pyvirtio back-end printed no JSON counters")
        return res


def run(cfg: DpdkBenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every target (pyvirtio once per policy and engine, then DPDK
    net_vhost), `cfg.rounds` times in turns, and return a JSON-able summary:
    `runs` (each with its `round`), the `summarize` fields and `ok`."""
    if shutil.which(TESTPMD) is None:
        raise RuntimeError(f"{TESTPMD} not found (install the dpdk package)")
    if cfg.rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {cfg.rounds}")
    ncpu = os.cpu_count() or 1
    if max(cfg.cpus) >= ncpu:
        raise RuntimeError(f"CPUs {cfg.cpus} requested but the machine has {ncpu}")
    workdir = tempfile.mkdtemp(prefix="pyvirtio-bench-dpdk-")
    runs: list[dict[str, Any]] = []
    jobs: list[tuple[str, str | None, str]] = []
    if "pyvirtio" in cfg.targets:
        jobs += [(f"pyvirtio-{p}" + ("-pure" if e == "pure" and "compiled" in cfg.engines else ""), p, e)
                 for p in cfg.policies for e in cfg.engines]
    if "dpdk" in cfg.targets:
        jobs.append(("dpdk-net_vhost", None, ""))
    ok = True
    try:
        with _sigterm_raises():
            seq = 0
            for rnd in range(1, cfg.rounds + 1):
                for label, policy, engine in jobs:
                    if progress:
                        progress(f"{label}: {cfg.mode} {cfg.ring} {cfg.seconds:g} s (+{cfg.warmup:g} s warm-up)"
                                 + (f", round {rnd}/{cfg.rounds}" if cfg.rounds > 1 else ""))
                    r = _Run(cfg, label, workdir, seq)
                    seq += 1
                    try:
                        res = r.run_pyvirtio(policy, engine) if policy is not None else r.run_dpdk()
                    except RuntimeError as exc:
                        log.error("%s failed: %s", label, exc)
                        res = {"label": label, "pps": None, "error": str(exc)}
                    finally:
                        r.cleanup()
                    res["policy"] = policy
                    res["round"] = rnd
                    if policy is not None:
                        res["engine"] = engine
                    if not res.get("pps"):
                        ok = False
                    runs.append(res)
    finally:
        if cfg.keep_logs:
            log.warning("process logs kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"config": asdict(cfg), "runs": runs, **summarize(runs, cfg.policies), "ok": ok}


def _median_pps(runs: list[dict[str, Any]], label: str) -> int | None:
    xs = [r["pps"] for r in runs if r["label"] == label and r.get("pps")]
    return round(statistics.median(xs)) if xs else None


def summarize(runs: list[dict[str, Any]], policies: tuple[str, ...]) -> dict[str, Any]:
    """Per target the median rate over its rounds; the ratio of each
    pyvirtio target's median to net_vhost's (`ratio_to_dpdk`); each round's
    own ratio (`round_ratios`: the two ran minutes apart at most); compiled
    over pure per policy."""
    dpdk = _median_pps(runs, "dpdk-net_vhost")
    labels = list(dict.fromkeys(r["label"] for r in runs if r["policy"] is not None))
    medians = {lb: _median_pps(runs, lb) for lb in labels}
    ratios = {lb.removeprefix("pyvirtio-"): (round(m / dpdk, 4) if m and dpdk else None)
              for lb, m in medians.items()}
    by_round = {r["round"]: r["pps"] for r in runs if r["label"] == "dpdk-net_vhost" and r.get("pps")}
    round_ratios = {lb.removeprefix("pyvirtio-"): [round(r["pps"] / by_round[r["round"]], 4) for r in runs
                                                   if r["label"] == lb and r.get("pps") and r["round"] in by_round]
                    for lb in labels}
    speedups = {}
    for p in policies:
        c = next((medians[lb] for lb in labels if lb == f"pyvirtio-{p}"), None)
        u = next((medians[lb] for lb in labels if lb == f"pyvirtio-{p}-pure"), None)
        if c and u:
            speedups[p] = round(c / u, 3)
    return {"dpdk_pps": dpdk, "median_pps": medians, "ratio_to_dpdk": ratios, "round_ratios": round_ratios,
            "compiled_over_pure": speedups}


def format_results(res: dict[str, Any]) -> str:
    cfg = res["config"]
    rounds = cfg.get("rounds", 1)
    lines = [(f"bench dpdk: mode {cfg['mode']}, {cfg['ring']} ring, {cfg['size']}-byte frames, "
              f"{cfg['seconds']:g} s" + (f" x {rounds} rounds" if rounds > 1 else "")
              + f", back-end CPU {cfg['cpus'][0]}, front-end (testpmd virtio-user) CPU {cfg['cpus'][1]}")]
    dpdk_of = {r.get("round", 1): r["pps"] for r in res["runs"] if r["label"] == "dpdk-net_vhost" and r.get("pps")}
    for r in res["runs"]:
        tag = f"{r['label']}" + (f" #{r.get('round', 1)}" if rounds > 1 else "")
        if r.get("pps") is None:
            lines.append(f"  {tag:22} FAILED: {r.get('error', 'no rate measured')[:300]}")
            continue
        line = f"  {tag:22} {r['pps']:>12,} pps"
        if r.get("policy") is not None:
            dpdk = dpdk_of.get(r.get("round", 1))
            if dpdk:
                line += f"  ({r['pps'] / dpdk:.3f}x net_vhost)"
            line += (f"  kicks/pkt {r.get('kicks_per_packet')}  interrupts/pkt {r.get('interrupts_per_packet')}"
                     f"  accesses/pkt {r.get('accesses_per_packet')}"
                     f" (metadata {r.get('metadata_accesses_per_packet')})")
        lines.append(line)
    if rounds > 1:
        lines.append(f"  medians over {rounds} rounds:")
        dpdk = res.get("dpdk_pps")
        if dpdk:
            lines.append(f"    {'dpdk-net_vhost':20} {dpdk:>12,} pps")
        for lb, m in (res.get("median_pps") or {}).items():
            if not m:
                continue
            key = lb.removeprefix("pyvirtio-")
            line = f"    {lb:20} {m:>12,} pps"
            x = (res.get("ratio_to_dpdk") or {}).get(key)
            if x:
                line += f"  ({x:.3f}x net_vhost's median)"
            rr = (res.get("round_ratios") or {}).get(key)
            if rr:
                line += f"  each round: {min(rr):.3f}x to {max(rr):.3f}x, median {statistics.median(rr):.3f}x"
            lines.append(line)
    for p, x in (res.get("compiled_over_pure") or {}).items():
        lines.append(f"  {p}: the compiled engine moves {x:.2f}x the packets of pure Python")
    return "\n".join(lines)
