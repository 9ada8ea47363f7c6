"""Hardware memory barriers callable from Python.

`full()` is the StoreLoad barrier the arm-then-recheck and the interrupt
decision need; `acquire()`/`release()` order loads after / stores before.

The compiled `_fence` extension (built at install time) is the normal path.
Without it we fall back to the membarrier(2) system call with
MEMBARRIER_CMD_GLOBAL, which the kernel documents as a full barrier on every
running thread of the system, the caller included: slow (it waits for an RCU
grace period) but correct on every architecture, where a lock round-trip or
an ordinary syscall is not a documented fence.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable

#: True on CPUs whose loads and stores may be reordered beyond StoreLoad
#: (everything but x86): the ring code then issues acquire/release barriers
#: explicitly; on x86-64 (TSO) only the full fences are needed.
WEAK_ORDERING = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")

full: Callable[[], None]
acquire: Callable[[], None]
release: Callable[[], None]
IMPLEMENTATION: str

try:
    from pyvirtio import _fence  # type: ignore[attr-defined,unused-ignore]

    full = _fence.full
    acquire = _fence.acquire
    release = _fence.release
    IMPLEMENTATION = "compiled"
except ImportError:  # pragma: no cover - exercised only without a C compiler
    _SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(platform.machine().lower())
    _MEMBARRIER_CMD_GLOBAL = 1
    _libc = ctypes.CDLL(None, use_errno=True)

    def _membarrier() -> None:
        if _SYS_MEMBARRIER is None or _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "membarrier(MEMBARRIER_CMD_GLOBAL) failed: " + os.strerror(err))

    full = acquire = release = _membarrier
    IMPLEMENTATION = "membarrier"
