"""The `pyvirtio` command: every front end lives in this package (one module
a command family). The CLI owns the terminal; the library never prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pyvirtio.cli.common import csv_list, engine_header, with_engine


def _bench_queue(args: argparse.Namespace) -> int:
    from pyvirtio.bench.queue import QueueBenchConfig, format_table, run

    results = []
    if not args.json:
        print(f"# {engine_header()}", file=sys.stderr, flush=True)
    for ring in args.ring:
        for policy in args.policy:
            cfg = QueueBenchConfig(ring=ring, policy=policy, batch=args.batch, requests=args.requests,
                                   event_idx=not args.no_event_idx, queue_size=args.queue_size,
                                   two_process=args.two_process, indirect=args.indirect,
                                   segments=args.segments, bulk=not args.no_bulk)
            if not args.json:
                print(f"# {ring}/{policy}: {args.requests} requests, batch {args.batch}"
                      f"{', two processes' if args.two_process else ''} ...", file=sys.stderr, flush=True)
            results.append(run(cfg))
    if args.json:
        print(json.dumps(with_engine(results[0] if len(results) == 1 else results), indent=1))
    else:
        print(engine_header())
        print(format_table(results))
    return 1 if any(r["lost"] for r in results) else 0


#: the command modules of this package; each exposes register(sub, bench_sub)
_COMMAND_MODULES: list[str] = ["pyvirtio.cli.frontend", "pyvirtio.cli.net", "pyvirtio.cli.blk", "pyvirtio.cli.rng",
                               "pyvirtio.cli.vsock", "pyvirtio.cli.fs", "pyvirtio.cli.guest"]


class _Version(argparse.Action):
    """--version: the version and the ring engine (imported only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(engine_header())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvirtio", description="virtio devices in Python over vhost-user")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--version", action=_Version,
                   help="print the version and the ring engine (mypyc or pure Python), then exit")
    sub = p.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = bench.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("queue", help="the virtqueue engine against the Python driver (no VM)")
    q.add_argument("--ring", type=csv_list(["split", "packed"]), default=["split", "packed"],
                   help="split, packed or both (comma list; default both)")
    q.add_argument("--policy", type=csv_list(["lazy", "eager"]), default=["lazy", "eager"],
                   help="lazy, eager or both (comma list; default both, side by side)")
    q.add_argument("--batch", type=int, default=32, help="requests the driver posts per kick (default 32)")
    q.add_argument("--requests", type=int, default=100_000, help="requests per run (default 100000)")
    q.add_argument("--queue-size", type=int, default=256)
    q.add_argument("--no-event-idx", action="store_true", help="do not negotiate VIRTIO_F_EVENT_IDX")
    q.add_argument("--indirect", action="store_true", help="negotiate INDIRECT_DESC (multi-segment requests)")
    q.add_argument("--segments", type=int, default=1, help="descriptors per request (default 1)")
    q.add_argument("--no-bulk", action="store_true",
                   help="one Chain object per request (pop_batch) instead of the vectorised pop_bulk")
    q.add_argument("--two-process", action="store_true",
                   help="driver in another process with real eventfds (real concurrency)")
    q.add_argument("--json", action="store_true", help="one JSON object (a list for several runs)")
    q.set_defaults(func=_bench_queue)
    # Each command module adds its parsers with set_defaults(func=...).
    import importlib
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub, bsub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
