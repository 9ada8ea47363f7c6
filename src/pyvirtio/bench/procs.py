"""What the guest benches share for the back-end processes they start."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


class BenchError(RuntimeError):
    """A target could not be measured (back-end or guest failed)."""


def wait_socket(proc: subprocess.Popen[bytes], path: Path, what: str, log_path: Path,
                timeout: float = 30.0) -> None:
    """Wait until `proc` creates the socket `path`; `BenchError` (with the
    end of its log) if it exits first or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {log_path.read_text()[-1500:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not create {path}")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


__all__ = ["BenchError", "stop_process", "wait_socket"]
