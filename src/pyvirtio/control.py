"""The operator's control socket of a running back-end: line-delimited JSON.

In the spirit of qemu-storage-daemon's QMP `block_resize`, but small: a
unix socket (owner-only by default) where each line is one JSON object with
a `cmd`, answered by one JSON line with `"ok": true` and the command's
fields, or `"ok": false` and an `error`. Commands are served one at a time,
in a thread of their own (never in the vhost-user server loop: a resize
waits for the front-end's ack, which that loop collects).

Commands (`BlkControl`, for `pyvirtio blk --control-socket PATH`):

- `{"cmd": "resize"}`: re-read the image's size (the operator grew it) and
  tell the guest; `{"cmd": "resize", "size": N}`: grow the image file to N
  bytes first. Answer: old and new capacity (512-byte sectors), the size in
  bytes, whether it changed, and what became of the guest notification
  (`notified`: acked, sent, timeout, failed, no-channel, deferred while the
  guest's driver runs no queue; or unchanged).
  Shrinking is refused with an error.
- `{"cmd": "stats"}`: the back-end's counters (what SIGUSR1 prints).
- `{"cmd": "help"}`: the commands.

`request(path, message)` is the client side (`pyvirtio blk-ctl`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from pyvirtio.devices.blk import BlkDevice, ResizeError

log = logging.getLogger(__name__)

#: longest request line accepted
MAX_LINE = 64 * 1024
#: seconds a client may take to send its line
CLIENT_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class CommandError(Exception):
    """A command the control socket refuses (its message goes back as `error`)."""


class ControlServer:
    """Serve `handler` on a unix socket at `path`, in a daemon thread.

    `handler(request)` gets the decoded object and returns the answer's
    fields; it raises `CommandError` (or `ValueError`/`OSError`) to answer
    `ok: false`. `close()` stops the thread and removes the socket.
    """

    def __init__(self, path: str, handler: Handler, *, mode: int = 0o600) -> None:
        self.path = path
        self.handler = handler
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; not removing it")
            os.unlink(path)  # a stale control socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        log.info("control socket on %s", path)

    def _run(self) -> None:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        continue
                    with conn:
                        self._serve(conn)
        finally:
            sel.close()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        buf = b""
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    answer = self.answer(line)
                    try:
                        conn.sendall(json.dumps(answer).encode() + b"\n")
                    except OSError:
                        return
            if len(buf) > MAX_LINE:
                try:
                    conn.sendall(json.dumps({"ok": False, "error": "request line too long"}).encode() + b"\n")
                except OSError:
                    pass
                return

    def answer(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (never raises)."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise CommandError('a request is a JSON object with a "cmd" string')
            log.info("control: %s", req)
            return {"ok": True, **self.handler(req)}
        except json.JSONDecodeError as e:
            return {"ok": False, "error": f"not JSON: {e}"}
        except (CommandError, ValueError, OSError) as e:
            log.warning("control: %s refused: %s", line[:200].decode(errors="replace"), e)
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug here: answered, logged, the socket keeps serving
            log.exception("control: %s failed", line[:200].decode(errors="replace"))
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    def close(self) -> None:
        """Stop serving and remove the socket. Idempotent."""
        if self._thread.is_alive():
            try:
                self._stop_w.send(b"x")
            except OSError:
                pass
            self._thread.join(CLIENT_TIMEOUT + 5)
        self._sock.close()
        for s in (self._stop_r, self._stop_w):
            s.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class BlkControl:
    """The commands of `pyvirtio blk`'s control socket (see the module docstring).

    `stats`: the back-end's counters (or `bind` a back-end later);
    `ack_wait`: how long a resize waits for the guest notification's outcome.
    """

    def __init__(self, device: BlkDevice, stats: Callable[[], dict[str, Any]] | None = None, *,
                 ack_wait: float = 6.0) -> None:
        self.device = device
        self.stats = stats
        self.ack_wait = ack_wait

    def bind(self, backend: Any) -> BlkControl:
        """Take `stats` from a back-end (anything with a `stats()` method)."""
        self.stats = backend.stats
        return self

    def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "resize":
            return self.resize(req.get("size"))
        if cmd == "stats":
            return {"stats": self.stats() if self.stats is not None else self.device.stats()}
        if cmd == "help":
            return {"commands": {"resize": "re-read the image size, or grow the file to \"size\" bytes; "
                                           "tells the guest",
                                 "stats": "the back-end's counters", "help": "this"}}
        raise CommandError(f"unknown command {cmd!r} (resize, stats, help)")

    def resize(self, size: object = None) -> dict[str, Any]:
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise CommandError(f'"size" is a number of bytes, not {size!r}')
        try:
            result = self.device.resize(size)
        except ResizeError as e:
            raise CommandError(str(e)) from None
        if not result.changed:
            notified = "unchanged"
        else:
            notice = result.notice
            wait = getattr(notice, "wait", None)
            notified = "no-transport" if wait is None else str(wait(self.ack_wait).value)
        return {"old_capacity": result.old_capacity, "capacity": result.capacity,
                "size": result.capacity * 512, "changed": result.changed, "notified": notified}

    def on_hup(self) -> None:
        """SIGHUP: re-read the image size (the outcome is logged, not awaited)."""
        try:
            result = self.device.resize()
        except (ResizeError, OSError) as e:
            log.error("SIGHUP resize refused: %s", e)
            return
        if result.changed:
            log.warning("SIGHUP: capacity %d -> %d sectors; guest notified through the back-end channel "
                        "(ack logged when it comes)", result.old_capacity, result.capacity)


def request(path: str, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to a control socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(message).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise ConnectionError(f"{path}: the back-end closed the control connection without an answer")
            buf += data
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise TypeError(f"{path}: answer is not a JSON object: {answer!r}")
    return answer


__all__ = ["BlkControl", "CommandError", "ControlServer", "Handler", "request"]
