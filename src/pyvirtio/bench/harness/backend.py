"""pyvirtio's own vhost-user-net back-end as a child process, next to a guest.

`PyvirtioNetBackend` runs `python -m pyvirtio net --socket-path ... --backend
tap:<TAP>` *inside* a `NetNamespace`, so the TAP it opens by name is the one
in that private namespace (a TAP can only be opened from the namespace it
lives in); the vhost-user socket is a filesystem path, which QEMU reaches
from wherever it runs. The guest's traffic therefore goes guest -> QEMU's
vhost-user front-end -> our back-end -> the namespace's TAP, and nowhere else.

The back-end's counters (kicks, interrupts, guest-memory accesses per queue)
are read with `stats()`: SIGUSR1 makes it append one JSON line to its
`--stats-file`, which is read back. `kill()` SIGKILLs it (to test QEMU's
`reconnect=`), `start()` again brings up a fresh one on the same socket path.
Every process is stopped by its pid; the socket directory is removed on close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pyvirtio.bench.harness.netns import NetNamespace, wrap_command

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The back-end process failed to start, died, or did not answer a stats request."""


class PyvirtioNetBackend:
    """One `pyvirtio net` process serving a TAP of `ns` on a vhost-user socket.

    Arguments:
        ns: the namespace to run in (its TAP is the default `--backend`); None
            runs in the caller's namespace (then pass `port`, e.g. "sink").
        policy: "lazy" or "eager" (`--policy`).
        queues: queue pairs (`--queues`; the TAP must be multi-queue for > 1).
        port: the `--backend` value (default `tap:<ns.tap>`).
        log_dir: where `backend.log` (its stderr) goes; default: the private
            socket directory, removed on close.
        profile_dir: set PYVIRTIO_PROFILE_DIR so each queue worker dumps a
            cProfile file there when it stops.
        extra_args: more `pyvirtio net` arguments.
        env: extra environment variables.
    """

    def __init__(
        self,
        ns: NetNamespace | None,
        *,
        policy: str = "lazy",
        queues: int = 1,
        port: str | None = None,
        log_dir: Path | None = None,
        profile_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        if policy not in ("lazy", "eager"):
            raise ValueError(f"policy must be lazy or eager, got {policy!r}")
        if port is None:
            if ns is None:
                raise ValueError("without a namespace, say which port to serve (e.g. port='sink')")
            port = f"tap:{ns.tap}"
        self.ns = ns
        self.policy = policy
        self.queues = queues
        self.port = port
        self.profile_dir = profile_dir
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        # A short private directory: unix socket paths are limited to 107 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="pvb-"))
        self.socket_path = str(self._dir / "net.sock")
        self.log_dir = log_dir if log_dir is not None else self._dir
        self.log_path = self.log_dir / "backend.log"
        self.stats_path = self.log_dir / "backend-stats.jsonl"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.pids: list[int] = []  # every process started, for leak checks
        self.last_stats: dict[str, Any] | None = None

    # -- process life cycle -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running back-end's pid (None before `start`)."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        """The `pyvirtio net` command line (without the namespace wrapper)."""
        return [
            sys.executable, "-m", "pyvirtio", "-v", "net",
            "--socket-path", self.socket_path,
            "--backend", self.port,
            "--policy", self.policy,
            "--queues", str(self.queues),
            "--stats-file", str(self.stats_path),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the back-end and wait until it listens. Raises `BackendError` if it does not."""
        if self.alive():
            raise BackendError(f"back-end already running (pid {self.pid})")
        self._reap()
        # A socket left by a killed back-end would look like a ready one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            env["PYVIRTIO_PROFILE_DIR"] = str(self.profile_dir)
        with open(self.log_path, "ab") as out:
            out.write(f"--- start {self.starts + 1}: {' '.join(self.argv())}\n".encode())
            out.flush()
            kwargs: dict[str, Any] = {"stdout": out, "stderr": subprocess.STDOUT, "env": env}
            if self.ns is not None:
                # Tracked by the namespace too: its close() stops it if we never get to.
                self._proc = self.ns.popen(self.argv(), **kwargs)
            else:
                self._proc = subprocess.Popen(
                    wrap_command(self.argv()), stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
                )
        self.starts += 1
        self.pids.append(self._proc.pid)
        log.info(
            "pyvirtio net back-end pid %d (%s, %s) on %s",
            self._proc.pid,
            self.policy,
            self.port,
            self.socket_path,
        )
        deadline = time.monotonic() + self.startup_timeout
        while not os.path.exists(self.socket_path):
            if not self.alive():
                raise BackendError(
                    f"back-end exited ({self._proc.returncode}) before listening:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BackendError(
                    f"back-end did not listen within {self.startup_timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the back-end (by pid) and reap it: a crash, as QEMU sees it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10.0)
        log.info("back-end pid %d killed", proc.pid)

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """SIGTERM the back-end (SIGKILL after `timeout`); return its final counters if it printed them."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            offset = self._stats_size()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("back-end pid %d ignored SIGTERM; killing it", proc.pid)
                self.kill()
            final = self._read_event("exit", offset)
            if final is not None:
                self.last_stats = final
            return final
        return None

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.wait()

    def close(self) -> None:
        """Stop the back-end if it runs and remove its socket directory. Idempotent."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- counters ---------------------------------------------------------------------------

    def _stats_size(self) -> int:
        try:
            return self.stats_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_event(self, event: str, offset: int) -> dict[str, Any] | None:
        """The first complete JSON line with this `event` written after byte `offset`."""
        try:
            with open(self.stats_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return None
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if isinstance(obj, dict) and obj.get("event") == event:
                return obj
        return None

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The back-end's counters now (SIGUSR1, then the JSON line it appends)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise BackendError("back-end is not running")
        offset = self._stats_size()
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            got = self._read_event("signal", offset)
            if got is not None:
                self.last_stats = got
                return got
            if proc.poll() is not None:
                raise BackendError(
                    f"back-end exited ({proc.returncode}) while asked for stats:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BackendError(f"back-end did not write stats within {timeout:g} s")
            time.sleep(0.01)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --- reading the counters ---------------------------------------------------------------------

#: Per-queue counters that `queue_deltas` subtracts (flat keys of the stats JSON; "accesses" is
#: the total guest-memory accesses, "metadata_accesses" those outside payload).
COUNTER_KEYS = (
    "packets",
    "bytes",
    "dropped",
    "kicks",
    "kick_count",
    "interrupts",
    "sleeps",
    "errors",
    "starts",
)


def _flat(q: Mapping[str, Any]) -> dict[str, int]:
    out = {k: int(q.get(k, 0)) for k in COUNTER_KEYS}
    acc = q.get("accesses")
    if isinstance(acc, Mapping):
        out["accesses"] = int(acc.get("total", 0))
        out["metadata_accesses"] = int(acc.get("metadata", 0))
    return out


def queue_counters(stats: Mapping[str, Any] | None) -> dict[str, dict[str, int]]:
    """Role ("rx0", "tx0", ...) -> flat counters, from one stats JSON object."""
    if not stats:
        return {}
    out: dict[str, dict[str, int]] = {}
    for q in stats.get("queues", []):
        if isinstance(q, Mapping):
            out[str(q.get("role", q.get("index")))] = _flat(q)
    return out


def queue_deltas(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> dict[str, dict[str, int]]:
    """Per-queue counter differences between two stats snapshots of the same back-end process."""
    b = queue_counters(before)
    a = queue_counters(after)
    out: dict[str, dict[str, int]] = {}
    for role, now in a.items():
        was = b.get(role, {})
        out[role] = {k: v - was.get(k, 0) for k, v in now.items()}
    return out


def ring_errors(stats: Mapping[str, Any] | None) -> int:
    """Ring violations (guest `QueueError`s and worker failures) over all queues."""
    return sum(c.get("errors", 0) for c in queue_counters(stats).values())


__all__ = [
    "COUNTER_KEYS",
    "BackendError",
    "PyvirtioNetBackend",
    "queue_counters",
    "queue_deltas",
    "ring_errors",
]
