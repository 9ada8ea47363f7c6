"""What the real-guest tests share: whether this machine can run them, and
whether a process they started is gone."""

from __future__ import annotations

import os
import shutil

from pyvirtio.bench.harness import find_kernel


def missing_requirements(*tools: str, why_root: str = "") -> str | None:
    """Why the guest tests cannot run here (None: they can): root, QEMU,
    `tools`, and a kernel to boot."""
    if os.geteuid() != 0:
        return f"needs root{f' ({why_root})' if why_root else ''}"
    for tool in ("qemu-system-x86_64", "ldd", *tools):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup.sh --peers)"
    try:
        find_kernel()
    except RuntimeError as e:
        return str(e)
    return None


def pid_alive(pid: int) -> bool:
    """Whether `pid` still runs (the tests reap what they start, so a stopped
    process is not even a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
