"""What the device commands (`pyvirtio net`, `pyvirtio blk`) share: the
stats JSON lines and serving one device's back-end until SIGTERM."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
from typing import Any, TextIO

log = logging.getLogger(__name__)


class StatsWriter:
    """Writes the back-end's counters as one JSON line (stderr or a file)."""

    def __init__(self, backend: Any, path: str | None) -> None:
        self.backend = backend
        self.path = path

    def __call__(self, event: str = "interval") -> None:
        line = json.dumps({"event": event, **self.backend.stats()}, separators=(",", ":"))
        if self.path is None:
            out: TextIO = sys.stderr
            print(line, file=out, flush=True)
        else:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def serve_device(command: str, device: Any, args: argparse.Namespace, started: str) -> int:
    """Serve `device` on --socket-path/--fd until SIGTERM; counters on
    SIGUSR1, every --stats-interval and at exit. `started` is logged once
    the socket is ready. Returns the exit status."""
    from pyvirtio.vhost_user.backend import Backend
    from pyvirtio.vhost_user.server import Server

    backend = Backend(device, policy=args.policy)
    stats = StatsWriter(backend, args.stats_file)
    try:
        server = Server(backend, socket_path=args.socket_path, fd=args.fd, mode=args.socket_mode,
                        on_tick=stats, tick_interval=args.stats_interval, on_usr1=lambda: stats("signal"))
    except (OSError, ValueError) as e:
        print(f"pyvirtio {command}: {e}", file=sys.stderr)
        backend.close()
        return 1
    server.install_signal_handlers()
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # thread dump for debugging a stall
    log.info("%s", started)
    try:
        server.serve_forever()
    finally:
        backend.close()
        stats("exit")
    return 0
