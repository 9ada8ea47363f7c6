"""`pyvirtio bench guest`: iperf3 in a Linux guest on pyvirtio-net vs QEMU's built-in virtio-net."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pyvirtio.bench.harness.iperf import TESTS
from pyvirtio.bench.harness.network import BACKENDS
from pyvirtio.cli.common import csv_list, engine_header, with_engine


def register(sub: Any, bench_sub: Any) -> None:
    p = bench_sub.add_parser(
        "guest",
        help="iperf3 in a Linux guest: pyvirtio-net (lazy, eager) vs QEMU's built-in virtio-net",
        description=(
            "Boot a Linux 6.1 guest (QEMU 7.2, TCG) per back-end, its NIC a virtio-net-pci (vectors=0) "
            "on a TAP in a private network namespace, and run iperf3 from the guest: TCP tx, TCP rx (-R), "
            "UDP tx (-u -b 0). Reports median and spread per back-end and, for pyvirtio, kicks, "
            "interrupts and guest-memory accesses per frame. Needs root, QEMU, a guest kernel, "
            "busybox-static and iperf3 (scripts/setup.sh --peers)."
        ),
    )
    p.add_argument(
        "--backends",
        type=csv_list(BACKENDS),
        default=None,
        help="comma list of lazy, eager, lazy-pure, eager-pure (the pure-Python ring engine), builtin "
             "(default lazy, eager, builtin, and lazy-pure when the engine is compiled)",
    )
    p.add_argument("--ring", choices=["split", "packed"], default="split")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each iperf3 test (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each test per back-end (default 3)")
    p.add_argument(
        "--tests",
        type=csv_list(list(TESTS)),
        default=list(TESTS),
        help=f"comma list of {', '.join(TESTS)} (default all)",
    )
    p.add_argument("--omit", type=int, default=1, help="warm-up seconds left out of each result (default 1)")
    p.add_argument("--queues", type=int, default=1, help="queue pairs, and as many guest vCPUs (default 1)")
    p.add_argument("--no-event-idx", action="store_true", help="event_idx=off on the device")
    p.add_argument("--no-indirect", action="store_true", help="indirect_desc=off on the device")
    p.add_argument("--no-mrg-rxbuf", action="store_true", help="mrg_rxbuf=off on the device")
    p.add_argument("--no-offloads", action="store_true", help="checksum and TSO offloads off (both ways)")
    p.add_argument(
        "--grouped",
        action="store_true",
        help="boot each back-end once and repeat there (default: every round boots each in turn)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the guest's vCPU thread to the last CPU and everything else to the others "
        "(for a machine nobody else is using)",
    )
    p.add_argument("--log-dir", metavar="DIR", help="keep every guest's and back-end's logs under DIR")
    p.add_argument(
        "--profile-dir",
        metavar="DIR",
        help="cProfile pyvirtio's queue workers (one .prof per worker under DIR)",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--device", choices=["net", "blk"], default="net",
                   help="blk: dd on pyvirtio-blk vs QEMU's virtio-blk and qemu-storage-daemon "
                        "(pyvirtio.bench.guest_blk; uses --backends, --repeat, --ring, --queues, --json)")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart (needs matplotlib: pyvirtio[bench])")
    p.set_defaults(func=_run)

    demo = sub.add_parser(
        "demo",
        help="the whole system in one command: a Linux guest on pyvirtio-net beside QEMU's own virtio-net",
        description=("Equivalent to `pyvirtio bench guest " + " ".join(DEMO_ARGS) + "`: boots a Linux guest "
                     "on pyvirtio-net (lazy policy) and one on QEMU's built-in virtio-net, each on a TAP in "
                     "a private network namespace, runs short iperf3 tests and prints the table (~40 s)."),
    )
    demo.set_defaults(func=lambda _args: _run(p.parse_args(list(DEMO_ARGS))))


#: what `pyvirtio demo` runs (the README's main job)
DEMO_ARGS = ("--backends", "lazy,builtin", "--seconds", "3", "--repeat", "1")


def _default_backends() -> list[str]:
    """lazy, eager, builtin; and lazy-pure beside lazy when the ring engine is compiled."""
    from pyvirtio import _engine

    return ["lazy", "lazy-pure", "eager", "builtin"] if _engine.is_compiled() else ["lazy", "eager", "builtin"]


def _run(args: argparse.Namespace) -> int:
    if args.device == "blk":
        from pyvirtio.bench.guest_blk import main_from_guest_args

        return main_from_guest_args(args)
    from pyvirtio.bench.guest import GuestBenchConfig, format_table, plot, run
    from pyvirtio.bench.harness.network import missing_requirements

    missing = missing_requirements()
    if missing:
        print(f"pyvirtio bench guest: {missing}", file=sys.stderr)
        return 2

    if args.plot:
        try:
            import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            print(
                "pyvirtio bench guest: --plot needs matplotlib (pip install 'pyvirtio[bench]')",
                file=sys.stderr,
            )
            return 2
    try:
        cfg = GuestBenchConfig(
            backends=tuple(args.backends or _default_backends()), ring=args.ring, seconds=args.seconds, repeat=args.repeat,
            tests=tuple(args.tests), omit=args.omit, event_idx=not args.no_event_idx,
            indirect=not args.no_indirect, mrg_rxbuf=not args.no_mrg_rxbuf, offloads=not args.no_offloads,
            queues=args.queues, grouped=args.grouped, pin=args.pin, log_dir=args.log_dir, profile_dir=args.profile_dir,
        )  # fmt: skip
    except ValueError as e:
        print(f"pyvirtio bench guest: {e}", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    res = run(cfg, progress)
    if args.plot:
        plot(res, args.plot)
        progress(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(with_engine(res), indent=1))
    else:
        print(engine_header())
        print(format_table(res))
    return 0 if res["ok"] else 1
