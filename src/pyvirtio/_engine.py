"""Which ring engine runs: the mypyc-compiled modules or pure Python.

The engine modules (ENGINE) may be installed twice over: `split.py` and,
beside it, `split.cpython-311-x86_64-linux-gnu.so` compiled from that same
file by mypyc (with the shared `pyvirtio__mypyc` library they load).
Python's path finder prefers the extension. With PYVIRTIO_PURE=1 in the
environment, `install()` (called by `pyvirtio/__init__.py`, before any
engine module can be imported) puts a finder first on `sys.meta_path` that
loads those modules from their `.py` source, so nothing compiled is ever
imported. Everything else imports normally either way.

Both engines cannot live in one process (they define the same classes);
to compare them, run one in a child process with PYVIRTIO_PURE=1.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

#: the modules setup.py compiles (keep in step with setup.py ENGINE)
ENGINE = frozenset({
    "pyvirtio.memory",
    "pyvirtio.spec",
    "pyvirtio.queue.chain",
    "pyvirtio.queue.bulk",
    "pyvirtio.queue.split",
    "pyvirtio.queue.packed",
    "pyvirtio.queue.virtqueue",
    "pyvirtio.queue.blkreq",
    "pyvirtio.runtime",
    "pyvirtio.vhost_user.inflight",
})

#: the environment variable that forces pure Python at run time
PURE_ENV = "PYVIRTIO_PURE"
PURE_REQUESTED = os.environ.get(PURE_ENV, "") not in ("", "0")


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Find the engine modules as `.py` source only."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ENGINE or path is None:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for d in path:
            f = os.path.join(d, leaf)
            if os.path.isfile(f):
                return importlib.util.spec_from_file_location(fullname, f)
        return None


def install() -> None:
    if PURE_REQUESTED:
        if not any(isinstance(f, _SourceOnly) for f in sys.meta_path):
            sys.meta_path.insert(0, _SourceOnly())
    else:
        _warn_if_stale()


def stale_modules() -> list[str]:
    """In a source tree (an editable install), the engine modules whose
    `.py` source is newer than the compiled module beside it (edited since
    the build: the compiled one would run)."""
    base = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(base, "..", "..", "setup.py")):
        return []  # an installed copy (a wheel sets no meaningful mtimes): only a source tree goes stale
    # The code lives in the group library beside the package (one shared
    # object for every module); the small per-module extension only loads
    # it, and a rebuild that changed no shim leaves the shim's old mtime.
    built = 0.0
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        try:
            built = max(built, os.stat(os.path.join(base, "..", "pyvirtio__mypyc" + suffix)).st_mtime)
        except OSError:
            pass
    out = []
    for m in sorted(ENGINE):
        parts = m.split(".")[1:]
        py = os.path.join(base, *parts) + ".py"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            so = os.path.join(base, *parts) + suffix
            try:
                if os.stat(py).st_mtime > max(os.stat(so).st_mtime, built):
                    out.append(m)
            except OSError:
                continue
            break
    return out


def _warn_if_stale() -> None:
    stale = stale_modules()
    if stale:
        import warnings

        warnings.warn(f"pyvirtio: the compiled ring engine is older than its source ({', '.join(stale)}): "
                      "the compiled code runs; rebuild (pip install -e .) or set PYVIRTIO_PURE=1",
                      RuntimeWarning, stacklevel=3)


def compiled_modules() -> list[str]:
    """The engine modules that run compiled (imports the engine)."""
    return sorted(m for m in ENGINE
                  if not (importlib.import_module(m).__file__ or "").endswith(".py"))


def name() -> str:
    """"mypyc" when every engine module runs compiled; "pure (PYVIRTIO_PURE=1)"
    or "pure (not compiled)" when none does; "mixed (compiled: ...)"
    otherwise; followed by " + C ring scan" when the rings' batch scans
    run in C (pyvirtio/_ringscan.c). Imports the engine."""
    compiled = compiled_modules()
    from pyvirtio import memory
    scan = " + C ring scan" if memory.HAVE_RING_SCAN else ""  # pyvirtio/_ringscan.c, never with PYVIRTIO_PURE=1
    if not compiled:
        return ("pure (PYVIRTIO_PURE=1)" if PURE_REQUESTED else "pure (not compiled)") + scan
    if len(compiled) == len(ENGINE):
        return "mypyc" + scan
    return f"mixed (compiled: {', '.join(compiled)})" + scan


def is_compiled() -> bool:
    """True when any engine module runs compiled (native classes: tests that
    patch engine internals need the pure engine)."""
    return bool(compiled_modules())


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess that runs the same engine as this
    process (PYVIRTIO_PURE passed on, or removed)."""
    e = dict(os.environ if env is None else env)
    if PURE_REQUESTED:
        e[PURE_ENV] = "1"
    else:
        e.pop(PURE_ENV, None)
    return e
