"""`pyvirtio bench guest`: iperf3 in a real Linux guest, on pyvirtio-net
(lazy and eager notification policies) and on QEMU's built-in virtio-net.

Each back-end gets a fresh `GuestNetwork` (private namespace + TAP, back-end,
QEMU 7.2/TCG guest with `virtio-net-pci,vectors=0`) and runs, from the guest:

- tcp_tx: iperf3 TCP guest -> namespace (Gbit/s at the receiver);
- tcp_rx: the same with `-R` (namespace -> guest);
- udp_tx: `-u -b 0` (datagrams per second the namespace received);

each `seconds` long after `omit` seconds of warm-up, `repeat` times. By
default the repeats are *rounds*: every round boots each back-end in turn
and runs all tests on it, so a change in the machine's load (it is shared)
hits every back-end alike instead of whichever ran last; `grouped` boots
each back-end once and repeats on that guest.

For pyvirtio the back-end's counters are read (SIGUSR1) before and after
every test; the per-frame figures use the queue carrying the test's data
(tx0 for tx tests, rx0 for rx): guest kicks (eventfd counts), interrupts
(call eventfd writes) and guest-memory accesses, divided by the frames on
that queue. With TSO a frame is up to 64 KB, so TCP figures are per
TSO frame, UDP figures per datagram.

Results: median and spread (min-max) per back-end and test, ratios of
medians (lazy / builtin, lazy / eager), and every sample in the JSON.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyvirtio.bench.harness.backend import queue_deltas
from pyvirtio.bench.harness.initramfs import InitramfsError, find_kernel
from pyvirtio.bench.harness.iperf import TESTS
from pyvirtio.bench.harness.network import BACKENDS, GuestNetwork, NetVariant

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: the queue whose counters describe each test's data path
DATA_QUEUE = {"tcp_tx": "tx", "tcp_rx": "rx", "udp_tx": "tx"}
#: headline unit per test
UNITS = {"tcp_tx": "Gbit/s", "tcp_rx": "Gbit/s", "udp_tx": "kpps"}
TEST_TITLES = {"tcp_tx": "TCP tx (guest -> host)", "tcp_rx": "TCP rx (host -> guest)", "udp_tx": "UDP tx"}


@dataclass(slots=True)
class GuestBenchConfig:
    backends: tuple[str, ...] = ("lazy", "eager", "builtin")
    ring: str = "split"
    seconds: float = 10.0
    repeat: int = 3
    tests: tuple[str, ...] = ("tcp_tx", "tcp_rx", "udp_tx")
    omit: int = 1
    event_idx: bool = True
    indirect: bool = True
    mrg_rxbuf: bool = True
    offloads: bool = True
    queues: int = 1
    grouped: bool = False  # one boot per back-end (instead of one per back-end per round)
    pin: bool = False  # vCPU threads on the last CPU, everything else on the others
    log_dir: str | None = None  # keep every guest's and back-end's logs here
    profile_dir: str | None = None  # cProfile our back-end's queue workers
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise ValueError(f"unknown back-end {b!r} (one of {', '.join(BACKENDS)})")
        for t in self.tests:
            if t not in TESTS:
                raise ValueError(f"unknown test {t!r} (one of {', '.join(TESTS)})")
        if self.seconds <= 0 or self.repeat < 1 or self.omit < 0:
            raise ValueError("seconds must be > 0, repeat >= 1, omit >= 0")

    def variant(self, backend: str) -> NetVariant:
        return NetVariant(
            backend,
            self.ring,
            event_idx=self.event_idx,
            indirect=self.indirect,
            mrg_rxbuf=self.mrg_rxbuf,
            offloads=self.offloads,
            queues=self.queues,
        )


def headline(test: str, sample: dict[str, Any]) -> float | None:
    """The number a test is judged by: Gbit/s for TCP, thousands of datagrams/s for UDP."""
    if test.startswith("udp"):
        pps = sample.get("packets_per_second")
        return None if pps is None else pps / 1e3
    bps = sample.get("bits_per_second")
    return None if bps is None else bps / 1e9


def per_frame(test: str, deltas: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per-frame figures of the test's data queue (summed over queue pairs) from counter deltas."""
    kind = DATA_QUEUE[test]
    data = [d for role, d in deltas.items() if role.startswith(kind)]
    other = [d for role, d in deltas.items() if not role.startswith(kind) and role[:2] in ("rx", "tx")]

    def total(qs: list[dict[str, int]], key: str) -> int:
        return sum(q.get(key, 0) for q in qs)

    frames = total(data, "packets")
    out: dict[str, Any] = {
        "queue": kind,
        "frames": frames,
        "errors": total(data + other, "errors"),
        "dropped": total(data, "dropped"),
    }
    if frames:
        out.update({
            "bytes_per_frame": round(total(data, "bytes") / frames, 1),
            "kicks_per_packet": round(total(data, "kick_count") / frames, 4),
            "interrupts_per_packet": round(total(data, "interrupts") / frames, 4),
            "accesses_per_packet": round(total(data, "accesses") / frames, 3),
            "metadata_accesses_per_packet": round(total(data, "metadata_accesses") / frames, 3),
            # the reverse queue (ACKs) costs the guest too
            "all_kicks_per_packet": round(total(data + other, "kick_count") / frames, 4),
            "all_interrupts_per_packet": round(total(data + other, "interrupts") / frames, 4),
        })  # fmt: skip
    return out


def _stat_cpu(path: str) -> tuple[str, float] | None:
    """(name, CPU seconds user + system) from a /proc `stat` file; None if it is gone."""
    try:
        with open(path) as f:
            st = f.read()
    except OSError:
        return None
    fields = st[st.rindex(")") + 2 :].split()
    return st[st.index("(") + 1 : st.rindex(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each thread of `pid`, keyed "name:tid"."""
    out: dict[str, float] = {}
    if pid is None:
        return out
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        got = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        if got is not None:  # (None: the thread ended)
            out[f"{got[0]}:{tid}"] = got[1]
    return out


def process_cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) of process `pid` so far, its ended
    threads included (0 when it is gone)."""
    got = None if pid is None else _stat_cpu(f"/proc/{pid}/stat")
    return 0.0 if got is None else got[1]


def is_vcpu_thread(key: str) -> bool:
    """Whether a `thread_cpu_seconds` key names one of QEMU's vCPU threads."""
    return "/TCG" in key or "/KVM" in key


def cpu_snapshot(gn: GuestNetwork) -> dict[str, float]:
    """CPU seconds so far of the guest's vCPU threads, QEMU's other threads, our back-end and
    the iperf3 server (the host-side costs of one test, read before and after it)."""
    out = {"vcpu": 0.0, "qemu": 0.0, "backend": 0.0, "iperf3_server": 0.0}
    if gn.guest is not None:
        for key, secs in thread_cpu_seconds(gn.guest.pid).items():
            out["vcpu" if is_vcpu_thread(key) else "qemu"] += secs
    if gn.backend is not None:
        out["backend"] = sum(thread_cpu_seconds(gn.backend.pid).values())
    if gn.server is not None:
        out["iperf3_server"] = sum(thread_cpu_seconds(gn.server.pid).values())
    return out


def pin(gn: GuestNetwork, vcpu_cpus: set[int], other_cpus: set[int]) -> None:
    """Pin the guest's vCPU threads to `vcpu_cpus` and everything else of the setup (QEMU's other
    threads, our back-end, the iperf3 server) to `other_cpus`. Threads started later inherit the
    affinity of the thread that starts them; call again after a back-end restart."""

    def setaff(tid: int, cpus: set[int]) -> None:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass

    if gn.guest is not None and gn.guest.pid is not None:
        for key in thread_cpu_seconds(gn.guest.pid):
            setaff(int(key.rpartition(":")[2]), vcpu_cpus if is_vcpu_thread(key) else other_cpus)
    for pid in (gn.backend.pid if gn.backend else None, gn.server.pid if gn.server else None):
        if pid is not None:
            for key in thread_cpu_seconds(pid):
                setaff(int(key.rpartition(":")[2]), other_cpus)


def cpu_percent(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Per-part CPU use between two `cpu_snapshot`s, in % of one core."""
    return (
        {k: round(100 * (after.get(k, 0.0) - v) / seconds, 1) for k, v in before.items()} if seconds else {}
    )


def cpu_us_per_frame(percent: float, seconds: float, frames: int) -> float:
    """CPU microseconds per frame of a process that used `percent` of one
    core for `seconds` while `frames` went through (the back-end's whole
    CPU: every queue and the control thread, over the test's data frames)."""
    return round(percent / 100 * seconds / frames * 1e6, 2)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM becomes SystemExit while the benchmark runs, so every guest,
    back-end and namespace is cleaned up (main thread only)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_exit)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _session(
    cfg: GuestBenchConfig,
    backend: str,
    rounds: list[int],
    progress: Progress,
    runs: dict[str, dict[str, Any]],
    seq: int,
) -> None:
    """Boot one guest on `backend` and run every test for each round in `rounds`."""
    entry = runs[backend]
    log_dir = Path(cfg.log_dir, f"{seq:02d}-{backend}") if cfg.log_dir else None
    profile = (
        Path(cfg.profile_dir, f"{seq:02d}-{backend}") if cfg.profile_dir and backend != "builtin" else None
    )
    tag = f"round {rounds[0] + 1}/{cfg.repeat}" if len(rounds) == 1 else f"{len(rounds)} repeats"
    progress(f"[{tag}] {backend}: booting ({cfg.variant(backend).label})")
    try:
        with GuestNetwork(cfg.variant(backend), log_dir=log_dir, profile_dir=profile) as gn:
            assert gn.guest is not None
            entry["boots"].append(round(gn.guest.boot_seconds or 0.0, 2))
            if gn.backend is not None and entry.get("negotiated") is None:
                entry["negotiated"] = gn.backend.stats().get("negotiated")
            entry["guest_features"] = gn.guest_features()
            for r in rounds:
                for test in cfg.tests:
                    progress(
                        f"[round {r + 1}/{cfg.repeat}] {backend}: {test} {cfg.seconds:g} s"
                        f" (+{cfg.omit} s warm-up)"
                    )
                    if gn.server is None:
                        gn.start_iperf_server()
                    if cfg.pin:
                        cpus = sorted(os.sched_getaffinity(0))
                        pin(gn, {cpus[-1]}, set(cpus[:-1]) or {cpus[-1]})
                    nic0 = gn.guest_nic_errors()
                    before = gn.backend.stats() if gn.backend is not None else None
                    cpu0, t0 = cpu_snapshot(gn), time.monotonic()
                    res = gn.iperf(test, cfg.seconds, omit=cfg.omit)
                    elapsed = time.monotonic() - t0
                    cpu = cpu_percent(cpu0, cpu_snapshot(gn), elapsed)
                    sample: dict[str, Any] = {"round": r + 1, **res.as_dict(), "host_cpu": cpu}
                    nic = {k: v - nic0.get(k, 0) for k, v in gn.guest_nic_errors().items()}
                    sample["guest_nic_errors"] = {k: v for k, v in nic.items() if v}
                    entry["guest_nic_errors"] += sum(nic.values())
                    if gn.backend is not None:
                        after = gn.backend.stats()
                        sample["counters"] = c = per_frame(test, queue_deltas(before, after))
                        if c["frames"] and "backend" in cpu:
                            c["backend_cpu_us_per_frame"] = cpu_us_per_frame(cpu["backend"], elapsed, c["frames"])
                    value = headline(test, sample)
                    sample["value"] = value
                    # The guest is CPU-bound under TCG: its throughput follows the CPU its vCPU thread
                    # got, which other work on the machine takes away. Per vCPU-second factors that out.
                    vcpu = cpu.get("vcpu", 0.0)
                    sample["value_per_vcpu"] = round(value / (vcpu / 100), 4) if value and vcpu > 5 else None
                    entry["samples"][test].append(sample)
                    extra = ""
                    if "counters" in sample and sample["counters"].get("frames"):
                        c = sample["counters"]
                        extra = (
                            f", {c['kicks_per_packet']:.3f} kicks/frame, {c['interrupts_per_packet']:.3f}"
                            f" irq/frame, {c['bytes_per_frame']:.0f} B/frame"
                        )
                        if "backend_cpu_us_per_frame" in c:
                            extra += f", back-end {c['backend_cpu_us_per_frame']:.1f} CPU us/frame"
                    extra += f"; CPU% vcpu {cpu['vcpu']:.0f} qemu {cpu['qemu']:.0f}"
                    if gn.backend is not None:
                        extra += f" backend {cpu['backend']:.0f}"
                    if sample["guest_nic_errors"]:
                        extra += f"; guest NIC errors {sample['guest_nic_errors']}"
                    progress(
                        f"[round {r + 1}/{cfg.repeat}] {backend}: {test} = {value:.3f} {UNITS[test]}{extra}"
                    )
            if gn.backend is not None:
                final = gn.backend.stats()
                entry["ring_errors"] += sum(q.get("errors", 0) for q in final.get("queues", []))
    except Exception as exc:  # noqa: BLE001  (a failed boot or test: record it, go on with the other back-ends)
        log.error("%s failed: %s", backend, exc)
        entry["errors"].append(f"{type(exc).__name__}: {str(exc)[:2000]}")
        progress(f"{backend}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "spread_pct": None}
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {
        "n": len(values),
        "median": round(med, 4),
        "min": round(lo, 4),
        "max": round(hi, 4),
        "spread_pct": round(100 * (hi - lo) / med, 1) if med else None,
    }


def summarize(cfg: GuestBenchConfig, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Median and spread per back-end and test, median per-frame counters, and ratios."""
    summary: dict[str, dict[str, Any]] = {}
    for backend, entry in runs.items():
        per_test: dict[str, Any] = {}
        for test in cfg.tests:
            samples = entry["samples"][test]
            s = _spread([x["value"] for x in samples if x.get("value") is not None])
            s["unit"] = UNITS[test]
            norm = [x["value_per_vcpu"] for x in samples if x.get("value_per_vcpu") is not None]
            s["median_per_vcpu"] = round(statistics.median(norm), 4) if norm else None
            counters = [x["counters"] for x in samples if x.get("counters", {}).get("frames")]
            for key in (
                "kicks_per_packet",
                "interrupts_per_packet",
                "accesses_per_packet",
                "metadata_accesses_per_packet",
                "bytes_per_frame",
                "all_kicks_per_packet",
                "all_interrupts_per_packet",
                "backend_cpu_us_per_frame",
            ):
                vals = [c[key] for c in counters if key in c]
                s[key] = round(statistics.median(vals), 4) if vals else None
            gcpu = [x["guest_cpu_percent"] for x in samples if x.get("guest_cpu_percent") is not None]
            s["guest_iperf3_cpu_percent"] = round(statistics.median(gcpu), 1) if gcpu else None
            cpus = [x["host_cpu"] for x in samples if x.get("host_cpu")]
            s["host_cpu_percent"] = (
                {k: round(statistics.median([c[k] for c in cpus]), 1) for k in cpus[0]} if cpus else None
            )
            per_test[test] = s
        summary[backend] = per_test

    def ratio(a: str, b: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for test in cfg.tests:
            x = summary.get(a, {}).get(test, {}).get("median")
            y = summary.get(b, {}).get(test, {}).get("median")
            out[test] = round(x / y, 3) if x and y else None
        return out

    def ratio_per_vcpu(a: str, b: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for test in cfg.tests:
            x = summary.get(a, {}).get(test, {}).get("median_per_vcpu")
            y = summary.get(b, {}).get(test, {}).get("median_per_vcpu")
            out[test] = round(x / y, 3) if x and y else None
        return out

    ratios, ratios_per_vcpu = {}, {}
    for a, b in (("lazy", "builtin"), ("lazy", "eager"), ("eager", "builtin"), ("lazy", "lazy-pure"),
                 ("lazy-pure", "builtin")):
        if a in summary and b in summary:
            ratios[f"{a}/{b}"] = ratio(a, b)
            ratios_per_vcpu[f"{a}/{b}"] = ratio_per_vcpu(a, b)
    return {"summary": summary, "ratios": ratios, "ratios_per_vcpu": ratios_per_vcpu}


def environment() -> dict[str, Any]:
    """Versions and machine facts printed with the results."""

    def first_line(argv: list[str]) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.splitlines()[0].strip() if out else None

    try:
        kernel: str | None = find_kernel().version
    except InitramfsError:
        kernel = None
    return {
        "guest_kernel": kernel,
        "qemu": first_line(["qemu-system-x86_64", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
    }


def run(cfg: GuestBenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict (`config`, `runs`, `summary`, `ratios`, `ok`)."""
    say = progress or (lambda msg: None)
    runs: dict[str, dict[str, Any]] = {
        b: {"variant": cfg.variant(b).as_dict(), "boots": [], "samples": {t: [] for t in cfg.tests},
            "errors": [], "ring_errors": 0, "guest_nic_errors": 0, "negotiated": None}
        for b in cfg.backends
    }  # fmt: skip
    t0 = time.monotonic()
    env = environment()
    seq = 0
    with _sigterm_raises():
        if cfg.grouped:
            for backend in cfg.backends:
                _session(cfg, backend, list(range(cfg.repeat)), say, runs, seq)
                seq += 1
        else:
            for r in range(cfg.repeat):
                for backend in cfg.backends:
                    _session(cfg, backend, [r], say, runs, seq)
                    seq += 1
    result: dict[str, Any] = {"config": asdict(cfg), "runs": runs, **summarize(cfg, runs)}
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    env["loadavg_end"] = os.getloadavg()[0]
    result["environment"] = env
    result["ok"] = all(
        not e["errors"] and not e["ring_errors"] and not e["guest_nic_errors"] for e in runs.values()
    )
    return result


# --- output ---------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report: one row per back-end, then per-frame counters and ratios."""
    cfg = res["config"]
    tests = cfg["tests"]
    v = NetVariant(
        "lazy",
        cfg["ring"],
        event_idx=cfg["event_idx"],
        indirect=cfg["indirect"],
        mrg_rxbuf=cfg["mrg_rxbuf"],
        offloads=cfg["offloads"],
        queues=cfg["queues"],
    )
    desc = v.label.removeprefix("lazy ")
    env = res.get("environment", {})
    lines = [
        (
            f"bench guest: {desc} ring, iperf3 {cfg['seconds']:g} s (+{cfg['omit']} s warm-up) x {cfg['repeat']}"
            f"{' (grouped)' if cfg['grouped'] else ' rounds'}{', pinned' if cfg['pin'] else ''}, "
            f"{res.get('elapsed_s', 0):.0f} s in all"
        ),
        (
            f"guest Linux {env.get('guest_kernel')} (TCG, {cfg['queues']} vCPU), virtio-net-pci vectors=0; "
            f"{env.get('qemu')}; {env.get('iperf3')}; host {env.get('cpus')} CPUs, load average "
            f"{env.get('loadavg', 0):.1f} -> {env.get('loadavg_end', 0):.1f}"
        ),
        "median [min-max] per back-end; TCP in Gbit/s at the receiver, UDP in thousands of datagrams/s received",
        "",
    ]
    head = f"{'backend':11}" + "".join(f"{TEST_TITLES[t]:>27}" for t in tests)
    lines.append(head)
    for backend, per_test in res["summary"].items():
        row = f"{backend:11}"
        for t in tests:
            s = per_test[t]
            cell = (
                f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]"
                if s["median"] is not None
                else "FAILED"
            )
            row += f"{cell:>27}"
        lines.append(row)
    ours = [b for b in res["summary"] if b != "builtin"]
    if ours:
        lines += ["", ("pyvirtio counters per frame on the data queue (median; TCP frames are TSO frames;"
                       " CPU us: the back-end process's CPU time per frame):")]
        lines.append(
            f"{'backend':11}{'test':8}{'kicks':>9}{'irqs':>9}{'accesses':>10}{'B/frame':>9}"
            f"{'all kicks':>11}{'all irqs':>10}{'CPU us':>9}"
        )
        for b in ours:
            for t in tests:
                s = res["summary"][b][t]
                lines.append(
                    f"{b:11}{t:8}{_fmt(s['kicks_per_packet']):>9}{_fmt(s['interrupts_per_packet']):>9}"
                    f"{_fmt(s['accesses_per_packet'], 2):>10}{_fmt(s['bytes_per_frame'], 0):>9}"
                    f"{_fmt(s['all_kicks_per_packet']):>11}{_fmt(s['all_interrupts_per_packet']):>10}"
                    f"{_fmt(s.get('backend_cpu_us_per_frame'), 1):>9}"
                )
    lines += [
        "",
        (
            "host CPU during each test, % of one core (median): vCPU thread / QEMU's other threads / "
            "pyvirtio back-end / iperf3 server"
        ),
    ]
    for backend, per_test in res["summary"].items():
        cells = []
        for t in tests:
            c = per_test[t].get("host_cpu_percent")
            cells.append(
                f"{t} "
                + (
                    "-"
                    if not c
                    else f"{c['vcpu']:.0f}/{c['qemu']:.0f}/{c['backend']:.0f}/{c['iperf3_server']:.0f}"
                )
            )
        lines.append(f"  {backend:11}" + "   ".join(cells))
    lines += [
        "",
        "per vCPU-second (result / share of a core the vCPU thread got; the TCG guest is CPU-bound):",
    ]
    for backend, per_test in res["summary"].items():
        lines.append(
            f"  {backend:11}" + "   ".join(f"{t} {_fmt(per_test[t].get('median_per_vcpu'))}" for t in tests)
        )
    if res.get("ratios"):
        lines += ["", "ratios of medians (per vCPU-second in brackets):"]
        for name, r in res["ratios"].items():
            rv = res.get("ratios_per_vcpu", {}).get(name, {})
            lines.append(
                f"  {name:20}" + "  ".join(f"{t} {_fmt(r[t], 2)}x [{_fmt(rv.get(t), 2)}x]" for t in tests)
            )
    for backend, entry in res["runs"].items():
        for err in entry["errors"]:
            lines.append(f"{backend}: FAILED: {err.splitlines()[0][:300]}")
        if entry["ring_errors"]:
            lines.append(f"{backend}: {entry['ring_errors']} ring error(s) in the back-end's counters")
        if entry.get("guest_nic_errors"):
            by_test = {t: sum(sum(x.get("guest_nic_errors", {}).values()) for x in entry["samples"][t])
                       for t in tests}  # fmt: skip
            lines.append(
                f"{backend}: WARNING: the guest driver counted {entry['guest_nic_errors']} errors/drops "
                f"({', '.join(f'{t} {n}' for t, n in by_test.items() if n)}): those results are not valid"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    """A bar chart of the three tests per back-end (median, min-max error bars), written to `path`.

    Needs matplotlib (`pip install 'pyvirtio[bench]'`); imported here only.
    """
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'pyvirtio[bench]'") from e
    cfg = res["config"]
    tests = cfg["tests"]
    backends = list(res["summary"])
    colors = {"lazy": "#1f77b4", "eager": "#ff7f0e", "builtin": "#7f7f7f"}
    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tests):
        meds, los, his = [], [], []
        for b in backends:
            s = res["summary"][b][t]
            m = s["median"] or 0.0
            meds.append(m)
            los.append(m - (s["min"] if s["min"] is not None else m))
            his.append((s["max"] if s["max"] is not None else m) - m)
        bars = ax.bar(
            backends, meds, yerr=[los, his], capsize=5, color=[colors.get(b, "#2ca02c") for b in backends]
        )
        for bar, m in zip(bars, meds):
            ax.annotate(
                f"{m:.2f}",
                (bar.get_x() + bar.get_width() / 2, m),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=9,
            )
        ax.set_title(TEST_TITLES[t])
        ax.set_ylabel(UNITS[t] if t != "udp_tx" else "k datagrams/s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"iperf3 in a Linux guest (QEMU TCG), {cfg['ring']} ring: median of {cfg['repeat']} "
        f"x {cfg['seconds']:g} s, bars min-max",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["GuestBenchConfig", "format_table", "headline", "per_frame", "plot", "run", "summarize"]
