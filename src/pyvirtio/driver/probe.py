"""`pyvirtio probe`: what a vhost-user-net back-end offers, and a short
conformance pass over it with the Python front-end.

`probe()` returns a `ProbeReport`: the negotiation as seen from the
front-end, then one `Check` per property (PASS, FAIL or SKIP with a reason).
The checks, per ring format asked for:

- negotiate: the whole setup sequence is accepted (every ack is 0);
- tx: N frames are all consumed and completed;
- rx: if frames come back (a loopback or forwarding peer), ours come back
  complete, intact and in order (a MAC swap is accepted); SKIP otherwise;
- ring state: GET_VRING_BASE reports, for each ring, the position just past
  the buffers the back-end completed (tx: exactly N);
- dirty log (first connection): a back-end that offers live migration
  (VHOST_F_LOG_ALL and LOG_SHMFD) is given a log as a migrating QEMU gives
  one, and must mark the pages of the used ring it wrote and of every
  receive buffer it filled; SKIP when migration is not offered;
- reconnect: a second connection after a clean disconnect negotiates again
  and moves traffic again (rx and ring state checked again).

The library never prints; the CLI prints the report (`format_report`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pyvirtio.driver.frontend import (
    RX_QUEUE,
    TX_QUEUE,
    FrontendError,
    VhostUserFrontend,
    feature_names,
    make_frame,
    protocol_feature_names,
)
from pyvirtio.spec import Feature
from pyvirtio.vhost_user import VHOST_F_LOG_ALL, ProtocolError, ProtocolFeature

log = logging.getLogger(__name__)

Verdict = Literal["PASS", "FAIL", "SKIP"]


@dataclass(slots=True, frozen=True)
class Check:
    """One conformance check's outcome."""

    name: str
    verdict: Verdict
    detail: str = ""


@dataclass(slots=True)
class ProbeReport:
    """What the back-end offered and negotiated, and the checks run."""

    socket_path: str
    offered_features: int | None = None
    offered_protocol_features: int | None = None
    negotiated: dict[str, dict[str, object]] = field(default_factory=dict)  # per ring format
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (and at least one ran)."""
        return bool(self.checks) and all(c.verdict != "FAIL" for c in self.checks)

    def as_dict(self) -> dict[str, object]:
        return {
            "socket_path": self.socket_path,
            "offered_features": self.offered_features,
            "offered_feature_names": feature_names(self.offered_features or 0),
            "offered_protocol_features": self.offered_protocol_features,
            "offered_protocol_feature_names": protocol_feature_names(self.offered_protocol_features or 0),
            "negotiated": self.negotiated,
            "checks": [{"name": c.name, "verdict": c.verdict, "detail": c.detail} for c in self.checks],
            "ok": self.ok,
        }


_ETHERTYPE = 0x88B5


def _ours(frame: bytes) -> int | None:
    """Sequence number of a `make_frame` frame, or None for a foreign one."""
    if len(frame) >= 18 and frame[12:14] == _ETHERTYPE.to_bytes(2, "big"):
        return int.from_bytes(frame[14:18], "big")
    return None


def _compare(sent: list[bytes], got: list[bytes]) -> tuple[Verdict, str]:
    mine = [f for f in got if _ours(f) is not None]
    if not got:
        return "SKIP", "no frames came back (not a loopback or forwarding back-end)"
    if not mine:
        return "SKIP", f"{len(got)} frames received, none of ours (a generator?)"
    for i, (s, g) in enumerate(zip(sent, mine, strict=False)):
        if g != s and g != s[6:12] + s[0:6] + s[12:]:
            seq = _ours(g)
            return "FAIL", f"frame {i} differs from what was sent (got sequence {seq}, {len(g)} bytes)"
    if len(mine) != len(sent):
        return "FAIL", f"{len(mine)} of our {len(sent)} frames came back"
    extra = len(got) - len(mine)
    return "PASS", f"{len(sent)} frames came back intact and in order" + (
        f" ({extra} foreign frames besides)" if extra else "")


def _traffic(fe: VhostUserFrontend, tag: str, frames: int, size: int, wait: float,
             add: Callable[[Check], None]) -> None:
    """tx, rx and ring-state checks on a connected front-end (then stopped)."""
    sent = [make_frame(size, i) for i in range(frames)]
    n = fe.send(sent, timeout=wait)
    done = fe.flush(wait)
    if n == frames and done:
        add(Check(f"{tag}: tx", "PASS", f"{frames} frames of {size} bytes consumed and completed"))
    else:
        add(Check(f"{tag}: tx", "FAIL", f"{n} of {frames} frames queued, "
                  f"{fe.tx_outstanding() if fe.tx is not None else '?'} not completed after {wait:g} s"))
    got: list[bytes] = []
    start = time.monotonic()
    deadline = start + wait
    while True:
        now = time.monotonic()
        if now >= deadline or sum(_ours(f) is not None for f in got) >= frames:
            break
        if not got and now - start >= min(1.0, wait):
            break  # nothing at all within a second: not a loopback
        got += fe.recv(min(0.2, deadline - now))
    verdict, detail = _compare(sent, got)
    add(Check(f"{tag}: rx", verdict, detail))
    bases = fe.stop()
    problems = []
    for idx, name in ((RX_QUEUE, "rx"), (TX_QUEUE, "tx")):
        base = bases[idx]
        want = fe.used_position(idx)
        if fe.packed:
            ok = base & 0xFFFF == want and (base >> 16 == 0 or base >> 16 == want)
        else:
            ok = base & 0xFFFF == want
        if not ok:
            problems.append(f"{name} ring base {base:#x}, expected {want:#x}")
    if problems:
        add(Check(f"{tag}: ring state", "FAIL", "; ".join(problems)))
    else:
        add(Check(f"{tag}: ring state", "PASS",
                  f"GET_VRING_BASE rx={bases[RX_QUEUE]:#x} tx={bases[TX_QUEUE]:#x} match the buffers completed"))


def _pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa >> 12, ((gpa + n - 1) >> 12) + 1))


def _dirty_log(fe: VhostUserFrontend, tag: str, frames: int, size: int, wait: float,
               add: Callable[[Check], None]) -> None:
    """The dirty-log check: logging on, traffic, the marks compared with
    what the back-end must have written, logging off."""
    name = f"{tag}: dirty log"
    if not (fe.offered_features or 0) & VHOST_F_LOG_ALL or \
            not (fe.offered_protocol_features or 0) & ProtocolFeature.LOG_SHMFD:
        add(Check(name, "SKIP", "live migration not offered (VHOST_F_LOG_ALL and LOG_SHMFD)"))
        return
    fe.start_dirty_log()
    fe.clear_dirty_log()
    sent = [make_frame(size, 10_000 + i) for i in range(frames)]
    fe.send(sent, timeout=wait)
    fe.flush(wait)
    got: list[bytes] = []
    deadline = time.monotonic() + min(wait, 1.0)
    while len(got) < frames and time.monotonic() < deadline:
        got += fe.recv(0.1)
    marked = fe.dirty_pages()
    fe.stop_dirty_log()
    assert fe.tx is not None and fe.rx is not None
    q = fe.queue_size
    if fe.packed:
        used = _pages(fe.tx.desc, 16 * q)
    else:
        used = _pages(fe.tx.device_area, 6 + 8 * q)
    problems = []
    if not used & marked:
        problems.append("the transmit ring's used entries were written but not marked")
    rx_pages = {a >> 12 for a in fe.buffer_addresses()["rx"]}
    if got and not rx_pages & marked:
        problems.append(f"{len(got)} frames were received into guest memory but no receive buffer page was marked")
    if problems:
        add(Check(name, "FAIL", "; ".join(problems)))
    else:
        add(Check(name, "PASS", f"{len(marked)} pages marked: the used ring" + (
            f" and the buffers of {len(got)} received frames" if got else " (no frame came back)")))


def probe(socket_path: str, *, rings: tuple[str, ...] = ("split", "packed"), frames: int = 64, size: int = 64,
          timeout: float = 3.0, on_check: Callable[[Check], None] | None = None) -> ProbeReport:
    """Probe the back-end at `socket_path`; never raises for back-end faults
    (they become FAIL checks). `on_check` is called as each check completes."""
    report = ProbeReport(socket_path)

    def add(c: Check) -> None:
        report.checks.append(c)
        if on_check is not None:
            on_check(c)

    for ring in rings:
        packed = ring == "packed"
        for attempt in ("first connection", "reconnect"):
            tag = f"{ring}, {attempt}"
            fe = VhostUserFrontend(socket_path, packed=packed, timeout=timeout, connect_timeout=timeout)
            try:
                try:
                    fe.connect()
                except FrontendError as exc:
                    if packed and fe.offered_features is not None and not fe.offered_features & Feature.RING_PACKED:
                        add(Check(f"{tag}: negotiate", "SKIP", "the back-end does not offer RING_PACKED"))
                        report.offered_features = fe.offered_features
                        break
                    add(Check(f"{tag}: negotiate", "FAIL", str(exc)))
                    break
                except ProtocolError as exc:
                    add(Check(f"{tag}: negotiate", "FAIL", f"protocol violation: {exc}"))
                    break
                report.offered_features = fe.offered_features
                report.offered_protocol_features = fe.offered_protocol_features
                report.negotiated[ring] = {
                    "features": fe.features,
                    "feature_names": feature_names(fe.features or 0),
                    "protocol_features": fe.protocol_features,
                    "protocol_feature_names": protocol_feature_names(fe.protocol_features or 0),
                    "queue_num": fe.queue_num,
                    "device_status": fe.device_status,
                    "queue_size": fe.queue_size,
                }
                add(Check(f"{tag}: negotiate", "PASS", "features " + "|".join(feature_names(fe.features or 0))))
                try:
                    if attempt == "first connection":
                        _dirty_log(fe, tag, min(frames, 32), size, timeout, add)
                    _traffic(fe, tag, frames, size, timeout, add)
                except (FrontendError, ProtocolError, OSError) as exc:
                    add(Check(f"{tag}: traffic", "FAIL", str(exc)))
                    break
            finally:
                fe.close()
    return report


def format_report(report: ProbeReport, checks: bool = True) -> str:
    """The human-readable report: offers, negotiation per ring, and (with
    `checks`) one PASS/FAIL/SKIP line per check and a summary."""
    lines = [f"back-end: {report.socket_path}"]
    if report.offered_features is not None:
        lines.append(f"features offered ({report.offered_features:#x}): "
                     + " ".join(feature_names(report.offered_features)))
    if report.offered_protocol_features is not None:
        lines.append(f"protocol features offered ({report.offered_protocol_features:#x}): "
                     + " ".join(protocol_feature_names(report.offered_protocol_features)))
    for ring, neg in report.negotiated.items():
        lines.append(f"{ring}: negotiated features ({neg['features']:#x}): " + " ".join(neg["feature_names"]))  # type: ignore[arg-type]
        pf = neg["protocol_features"]
        lines.append(f"{ring}: negotiated protocol features"
                     + (f" ({pf:#x}): " + " ".join(neg["protocol_feature_names"]) if pf is not None  # type: ignore[arg-type]
                        else ": none (PROTOCOL_FEATURES not offered)"))
        qn = neg["queue_num"]
        st = neg["device_status"]
        lines.append(f"{ring}: queue size {neg['queue_size']}, queue pairs (GET_QUEUE_NUM) "
                     f"{qn if qn is not None else 'n/a'}, device status "
                     f"{f'{st:#x}' if isinstance(st, int) else 'n/a'}")
    if checks:
        for c in report.checks:
            lines.append(f"{c.verdict:4}  {c.name}" + (f": {c.detail}" if c.detail else ""))
        failed = sum(c.verdict == "FAIL" for c in report.checks)
        lines.append(f"{'OK' if report.ok else 'FAILED'}: {len(report.checks)} checks, {failed} failed")
    return "\n".join(lines)
