"""`pyvirtio net`: serve virtio-net over vhost-user (QEMU back-end program conventions)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pyvirtio.devices._cli_common import serve_device

log = logging.getLogger(__name__)

CAPABILITIES = {"type": "net"}


def register(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser(
        "net", help="serve a virtio-net device over vhost-user",
        description="Serve virtio-net to a vhost-user front-end (QEMU -netdev vhost-user, DPDK virtio-user). "
                    "Counters are printed as JSON lines on SIGUSR1, at exit and every --stats-interval.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="create and listen on this unix socket")
    where.add_argument("--fd", type=int, metavar="N",
                       help="inherited socket: listening (accepted on) or already connected")
    p.add_argument("--print-capabilities", action="store_true",
                   help='print {"type": "net"} and exit (QEMU back-end program conventions)')
    p.add_argument("--backend", default="sink", metavar="KIND",
                   help="tap:NAME, sink, loopback or gen[:SIZE] (default sink)")
    p.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs (default 1)")
    p.add_argument("--policy", choices=["lazy", "eager"], default="lazy",
                   help="notification policy (eager: the pre-optimisation baseline)")
    p.add_argument("--queue-size-max", type=int, default=1024, metavar="N",
                   help="largest ring accepted (default 1024)")
    p.add_argument("--batch", type=int, default=1024, metavar="N",
                   help="chains taken per ring step, at most (default 1024)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--mac", help="device MAC address (default: random, locally administered)")
    p.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o600, metavar="OCTAL",
                   help="permissions of the created socket (default 600)")
    p.add_argument("--stats-interval", type=float, metavar="S", help="print counters every S seconds")
    p.add_argument("--stats-file", metavar="PATH", help="append the JSON lines here instead of stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if args.socket_path is None and args.fd is None:
        print("pyvirtio net: one of --socket-path or --fd is required", file=sys.stderr)
        return 2

    from pyvirtio.devices.net import NetDevice, parse_mac

    try:
        device = NetDevice(args.backend, queue_pairs=args.queues, mtu=args.mtu,
                           mac=parse_mac(args.mac) if args.mac else None,
                           queue_size_max=args.queue_size_max, batch=args.batch)
    except (ValueError, OSError) as e:
        print(f"pyvirtio net: {e}", file=sys.stderr)
        return 1
    where = args.socket_path or f"fd {args.fd}"
    return serve_device("net", device, args, f"net device on {where}, backend {args.backend}, "
                                             f"{args.queues} queue pair(s), pid {os.getpid()}")
