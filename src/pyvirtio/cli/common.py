"""What the commands share: comma lists, and for the device commands
(`pyvirtio net`, `pyvirtio blk`, `pyvirtio rng`, ...) the serving options,
the stats JSON lines and serving one device's back-end until SIGTERM."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

log = logging.getLogger(__name__)


def csv_list(choices: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    """An argparse type for a comma list ("a,b"), each item one of `choices` if given."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("an empty list")
        for t in items:
            if choices is not None and t not in choices:
                raise argparse.ArgumentTypeError(f"{t!r} is not one of {', '.join(choices)}")
        return items
    return parse


def add_serving_args(p: argparse.ArgumentParser, capabilities_help: str) -> None:
    """The options every device command has: where to serve, the
    capabilities answer, the notification policy, the socket's mode and
    the stats output."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="create and listen on this unix socket")
    where.add_argument("--fd", type=int, metavar="N",
                       help="inherited socket: listening (accepted on) or already connected")
    p.add_argument("--print-capabilities", action="store_true", help=capabilities_help)
    p.add_argument("--policy", choices=["lazy", "eager"], default="lazy",
                   help="notification policy (eager: the pre-optimisation baseline)")
    p.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600, metavar="OCTAL",
                   help="permissions of the created socket (default 600)")
    p.add_argument("--stats-interval", type=float, metavar="S", help="print counters every S seconds")
    p.add_argument("--stats-file", metavar="PATH", help="append the JSON lines here instead of stderr")


def early_exit(command: str, args: argparse.Namespace, capabilities: dict[str, Any]) -> int | None:
    """The exit status when the command ends before serving: capabilities
    printed (0) or no place to serve (2); None: go on."""
    if args.print_capabilities:
        print(json.dumps(capabilities))
        return 0
    if args.socket_path is None and args.fd is None:
        print(f"pyvirtio {command}: one of --socket-path or --fd is required", file=sys.stderr)
        return 2
    return None


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


def serve_device(command: str, device: Any, args: argparse.Namespace, started: str, *,
                 control: Callable[[Any], Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
                 on_hup: Callable[[], None] | None = None) -> int:
    """Serve `device` on --socket-path/--fd until SIGTERM; counters on
    SIGUSR1, every --stats-interval and at exit. `started` is logged once
    the socket is ready. `device` is a `pyvirtio.Device` or a
    `VirtioDevice`. `control(backend)` gives the handler of the operator's
    control socket (`pyvirtio.control`), served on --control-socket when
    given; `on_hup` runs on SIGHUP. Returns the exit status."""
    from pyvirtio.control import ControlServer
    from pyvirtio.device import as_virtio_device
    from pyvirtio.runtime import settle_heap
    from pyvirtio.vhost_user.backend import Backend
    from pyvirtio.vhost_user.server import Server

    backend = Backend(as_virtio_device(device), policy=args.policy)
    stats = StatsWriter(backend, args.stats_file)
    try:
        server = Server(backend, socket_path=args.socket_path, fd=args.fd, mode=args.socket_mode,
                        on_tick=stats, tick_interval=args.stats_interval, on_usr1=lambda: stats("signal"),
                        on_hup=on_hup)
    except (OSError, ValueError) as e:
        print(f"pyvirtio {command}: {e}", file=sys.stderr)
        backend.close()
        return 1
    ctl = None
    control_path = getattr(args, "control_socket", None)
    if control is not None and control_path:
        try:
            ctl = ControlServer(control_path, control(backend), mode=args.socket_mode)
        except OSError as e:
            print(f"pyvirtio {command}: control socket {control_path}: {e}", file=sys.stderr)
            server.close()
            backend.close()
            return 1
    server.install_signal_handlers()
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # thread dump for debugging a stall
    log.info("%s", started)
    settle_heap()
    try:
        server.serve_forever()
    finally:
        if ctl is not None:
            ctl.close()
        backend.close()
        stats("exit")
    return 0


def engine_header() -> str:
    """The line every bench prints first: the version and which ring engine
    runs (mypyc-compiled or pure Python; back-ends a bench starts inherit
    PYVIRTIO_PURE through the environment, so they run the same one)."""
    from pyvirtio import __version__, _engine

    return f"pyvirtio {__version__}, ring engine: {_engine.name()}"


def with_engine(result: Any) -> Any:
    """`result` (a dict, or a list of dicts) with an "engine" entry, for --json output."""
    from pyvirtio import _engine

    name = _engine.name()
    for r in result if isinstance(result, list) else [result]:
        if isinstance(r, dict):
            r["engine"] = name
    return result
