"""Build: the C fence extension, and the ring engine compiled by mypyc.

Compiled pieces (all optional; pure Python is complete without them):

- `pyvirtio._fence` (src/pyvirtio/_fence.c): a full memory barrier.
  pyvirtio.fence falls back to membarrier(2) when it could not be built.
- `pyvirtio._ringscan` (src/pyvirtio/_ringscan.c): the rings' batch scans
  and used writes in one call each; queue/split.py and queue/packed.py keep
  the numpy versions beside them.
- the ring engine and the queue loop (the modules in ENGINE), compiled from their own `.py`
  source by mypyc: one shared library (`pyvirtio__mypyc`) and, beside each
  `.py` file, a small extension of the same name that loads it. Without
  mypy/mypyc or a C compiler the build prints one warning and installs pure
  Python.

Environment:
- PYVIRTIO_PURE_BUILD=1: do not compile the engine (pure-Python install).
- PYVIRTIO_PURE=1 (run time, see pyvirtio/_engine.py): ignore the compiled
  engine even when it is installed.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: the engine modules mypyc compiles (keep in step with pyvirtio/_engine.py)
ENGINE = [
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
]
GROUP = "pyvirtio"  # the shared library: pyvirtio__mypyc

FENCE = Extension("pyvirtio._fence", ["src/pyvirtio/_fence.c"], optional=True)
#: the rings' batch scans (the engine's one hand-written C piece; the numpy
#: versions beside it in queue/split.py and queue/packed.py run without it)
RINGSCAN = Extension("pyvirtio._ringscan", ["src/pyvirtio/_ringscan.c"], optional=True)


def _warn(msg: str) -> None:
    print(f"WARNING: pyvirtio: {msg}; installing the pure-Python ring engine", file=sys.stderr)


def _engine_extensions() -> list[Extension]:
    if os.environ.get("PYVIRTIO_PURE_BUILD", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypy (with mypyc) is not available")
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join("src", *m.split(".")) + ".py" for m in ENGINE]
    old = os.getcwd()
    os.chdir(here)
    try:
        # mypy settings of their own, independent of what else the build
        # environment holds (numpy may be missing in an isolated build: its
        # values are plain objects to mypyc either way)
        os.makedirs("build", exist_ok=True)
        config = os.path.join("build", "mypyc.ini")
        with open(config, "w") as f:
            f.write("[mypy]\npython_version = 3.11\nignore_missing_imports = True\nfollow_imports = silent\n")
        return list(mypycify(["--config-file", config, *paths], opt_level="3", debug_level="1",
                             group_name=GROUP))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a mypyc that refuses the source: stay pure
        _warn(f"mypyc failed ({type(e).__name__}: {e})")
        return []
    finally:
        os.chdir(old)


def _is_engine(ext: Extension) -> bool:
    return ext.name in ENGINE or ext.name.endswith("__mypyc")


class BuildExt(build_ext):
    """Adds the engine when a build really runs (metadata preparation never
    compiles or warns), builds its shared library before the per-module
    extensions, and turns any engine failure into one warning and a
    pure-Python install (never a mix of compiled and pure engine modules)."""

    def finalize_options(self) -> None:
        dist = self.distribution
        if not any(_is_engine(e) for e in dist.ext_modules or ()):
            dist.ext_modules = [*(dist.ext_modules or ()), *_engine_extensions()]
        super().finalize_options()

    def build_extensions(self) -> None:
        engine = sorted((e for e in self.extensions if _is_engine(e)),
                        key=lambda e: not e.name.endswith("__mypyc"))
        for ext in self.extensions:
            if not _is_engine(ext):
                with self._filter_build_errors(ext):  # the fence: optional, says so itself
                    self.build_extension(ext)
        for ext in engine:
            ext.optional = True  # (a missing one is then not copied in place)
        built: list[str] = []
        for ext in engine:
            try:
                self.build_extension(ext)
            except Exception as e:  # noqa: BLE001 - compiler missing or failing
                for path in built:  # never a half-compiled engine
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                _warn(f"compiling {ext.name} failed ({type(e).__name__}: {e})")
                return
            built.append(self.get_ext_fullpath(ext.name))


setup(ext_modules=[FENCE, RINGSCAN], cmdclass={"build_ext": BuildExt})
