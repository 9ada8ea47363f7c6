"""pyvirtio: virtio devices in Python, served over vhost-user.

The device API (imported on first use, so `import pyvirtio` stays light):
`Device` (subclass it), `serve` / `serve_async` (run it), `Chain` (one
request as the device sees it), `Feature` (ring feature bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from pyvirtio import _engine  # before any engine module: PYVIRTIO_PURE=1 must come first

_engine.install()

if TYPE_CHECKING:
    from pyvirtio.device import Device, serve, serve_async
    from pyvirtio.queue import Chain
    from pyvirtio.spec import Feature

_LAZY = {"Device": "pyvirtio.device", "serve": "pyvirtio.device", "serve_async": "pyvirtio.device",
         "Chain": "pyvirtio.queue", "Feature": "pyvirtio.spec"}

__all__ = ["Chain", "Device", "Feature", "__version__", "serve", "serve_async"]

if not TYPE_CHECKING:  # (hidden from mypy: it would type every pyvirtio.<name> as Any)

    def __getattr__(name: str) -> Any:
        mod = _LAZY.get(name)
        if mod is None:
            raise AttributeError(f"module 'pyvirtio' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(mod), name)
        globals()[name] = value
        return value
