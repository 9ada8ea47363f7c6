"""The vhost-user socket server: the only part of the transport that does I/O.

One front-end at a time. Bytes and SCM_RIGHTS fds go into the codec's
`Decoder`, each decoded request into the `Backend`, each reply back out in
one `sendmsg`. A `ProtocolError` (the front-end's fault) closes that
connection with a logged reason; the server keeps listening and the next
front-end starts from a clean back-end.

Sockets (QEMU's back-end program conventions): `socket_path` creates the
socket (removing a stale one, owner-only permissions by default) and
listens; `fd` is an inherited socket: accepted on if it is listening
(SO_ACCEPTCONN), else used as the connected socket (the server then exits
when it closes). The server never daemonizes; SIGTERM/SIGINT stop it
promptly and cleanly (socket removed, rings stopped, memory unmapped).

The back-end request channel (SET_BACKEND_REQ_FD) is served by the same
loop: its socket is selected on beside the connection, the front-end's acks
are read as they come and overdue ones time out, so waiting for an ack never
stops the main socket from being served (QEMU answers a CONFIG_CHANGE_MSG
only after asking GET_CONFIG on it). SIGHUP runs `on_hup` in the loop.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable
from types import FrameType

from pyvirtio.vhost_user.backend import Backend
from pyvirtio.vhost_user.channel import BackendChannel
from pyvirtio.vhost_user.codec import Decoder, Message, ProtocolError
from pyvirtio.vhost_user.protocol import MAX_FDS, MAX_MESSAGE_SIZE, Request

log = logging.getLogger(__name__)

#: seconds a reply may wait for the front-end to make room in its socket
REPLY_TIMEOUT = 1.0

_FD_SIZE = array.array("i").itemsize
#: room for one more fd than a conforming message carries, so that an
#: oversupply is seen (and refused) rather than silently truncated
_ANCBUF = socket.CMSG_SPACE((MAX_FDS + 1) * _FD_SIZE)


class SocketInUse(OSError):
    """Another server is listening on the socket path."""


def _listen_on_path(path: str, mode: int) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            log.info("removing stale socket %s", path)
            os.unlink(path)
        else:
            raise SocketInUse(errno.EADDRINUSE, f"{path}: another back-end is listening there")
        finally:
            probe.close()
    # Bind and listen under a temporary name, then rename: the path appears
    # only once it accepts connections (a front-end that waits for the file
    # and connects at once is never refused).
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) >= 108:  # sun_path limit: bind in place
        tmp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window in which the socket is more open than `mode`
    try:
        if tmp != path and os.path.lexists(tmp):
            os.unlink(tmp)
        sock.bind(tmp)
        os.chmod(tmp, mode)
        sock.listen(1)
        if tmp != path:
            os.rename(tmp, path)
    except BaseException:
        sock.close()
        if tmp != path and os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.umask(old)
    return sock


def _recv_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(a)
    return fds


class Server:
    """Serve one `Backend` on a unix socket until `stop()` or a signal.

    `on_tick` (with `tick_interval` seconds) runs periodically in the server
    thread (stats printing); `on_usr1` runs on SIGUSR1, `on_hup` on SIGHUP
    (when given; blk: re-read the image size).
    """

    def __init__(self, backend: Backend, *, socket_path: str | None = None, fd: int | None = None,
                 mode: int = 0o600, on_tick: Callable[[], None] | None = None,
                 tick_interval: float | None = None, on_usr1: Callable[[], None] | None = None,
                 on_hup: Callable[[], None] | None = None) -> None:
        if (socket_path is None) == (fd is None):
            raise ValueError("give exactly one of socket_path and fd")
        self.backend = backend
        self.socket_path = socket_path
        self.on_tick = on_tick
        self.tick_interval = tick_interval
        self.on_usr1 = on_usr1
        self.on_hup = on_hup
        self._hup = False
        self._channel: BackendChannel | None = None  # the back-end channel registered in the selector
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self._decoder: Decoder | None = None
        self._path_inode: tuple[int, int] | None = None
        self._stopping = False
        self._usr1 = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        backend.on_channel_change = self._wake
        self.connections = 0
        self.last_error: ProtocolError | None = None
        if socket_path is not None:
            self.listener = _listen_on_path(socket_path, mode)
            st = os.stat(socket_path)
            self._path_inode = (st.st_dev, st.st_ino)
            log.info("listening on %s", socket_path)
        else:
            assert fd is not None
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX:
                sock.detach()
                raise ValueError(f"fd {fd} is not a unix socket")
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self.listener = sock
                log.info("accepting on inherited fd %d", fd)
            else:
                log.info("serving the connected socket inherited as fd %d", fd)
                self._attach(sock)
        if self.listener is not None and self.conn is None:
            self._sel.register(self.listener, selectors.EVENT_READ, "listen")

    # -- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the server loop to exit (thread-safe, signal-safe)."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGUSR1 runs `on_usr1` (main thread only)."""
        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self.stop()

        def usr1(signum: int, frame: FrameType | None) -> None:
            self._usr1 = True
            try:
                self._wake_w.send(b"u")
            except OSError:
                pass

        def hup(signum: int, frame: FrameType | None) -> None:
            self._hup = True
            self._wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, usr1)
        if self.on_hup is not None:
            signal.signal(signal.SIGHUP, hup)

    # -- the loop -----------------------------------------------------------------

    def serve_forever(self) -> None:
        next_tick = None if not self.tick_interval else time.monotonic() + self.tick_interval
        try:
            while not self._stopping:
                channel = self._sync_channel()
                deadline = next_tick
                ack_due = None if channel is None else channel.next_deadline()
                if ack_due is not None and (deadline is None or ack_due < deadline):
                    deadline = ack_due
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, _ in self._sel.select(timeout):
                    if key.data == "wake":
                        self._drain_wake()
                    elif key.data == "listen":
                        self._accept()
                    elif key.data == "conn":
                        self._on_readable()
                    elif key.data == "channel" and not key.fileobj.on_readable():  # type: ignore[union-attr]
                        self._sync_channel()
                    if self._stopping:
                        break
                if channel is not None:
                    channel.expire()
                if self._usr1:
                    self._usr1 = False
                    if self.on_usr1 is not None:
                        self.on_usr1()
                if self._hup:
                    self._hup = False
                    if self.on_hup is not None:
                        self.on_hup()
                if next_tick is not None and time.monotonic() >= next_tick:
                    next_tick += self.tick_interval  # type: ignore[operator]
                    if self.on_tick is not None:
                        self.on_tick()
                if self.listener is None and self.conn is None:
                    break  # a connected --fd socket that closed: nothing left to serve
        finally:
            self.close()

    def _sync_channel(self) -> BackendChannel | None:
        """Select on the back-end's current channel (the front-end may have
        set, replaced or closed it); returns it while it is open."""
        current = self.backend.channel
        if current is not None and current.closed:
            current = None
        if current is not self._channel:
            old = self._channel
            if old is not None:
                try:
                    self._sel.unregister(old)
                except (KeyError, ValueError, OSError):
                    pass
                old.close()  # given up or replaced: closed here, after it left the selector
            self._channel = current
            if current is not None:
                current.on_change = self._wake
                try:
                    self._sel.register(current, selectors.EVENT_READ, "channel")
                except (ValueError, OSError):  # closed meanwhile (a failed send in another thread)
                    self._channel = current = None
        return current

    def close(self) -> None:
        """Drop the connection, stop the device, remove the socket. Idempotent."""
        self._detach()
        self._sync_channel()
        if self.listener is not None:
            try:
                self._sel.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
            self.listener = None
        if self.socket_path is not None and self._path_inode is not None:
            try:
                st = os.stat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._path_inode:  # still ours
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            self._path_inode = None
        for s in (self._wake_r, self._wake_w):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        self._sel.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    # -- connections -----------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._attach(conn)

    def _attach(self, conn: socket.socket) -> None:
        # A reply that cannot be sent within REPLY_TIMEOUT means the front-end
        # stopped reading: drop it rather than block the server (and SIGTERM).
        conn.settimeout(REPLY_TIMEOUT)
        self.conn = conn
        self._decoder = self.backend.decoder()
        self.connections += 1
        if self.listener is not None:
            try:
                self._sel.unregister(self.listener)  # one front-end at a time
            except (KeyError, ValueError):
                pass
        self._sel.register(conn, selectors.EVENT_READ, "conn")
        log.info("frontend connected (connection %d)", self.connections)

    def _detach(self) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self.backend.disconnect()
        if self.listener is not None and not self._stopping:
            self._sel.register(self.listener, selectors.EVENT_READ, "listen")

    def _on_readable(self) -> None:
        conn, dec = self.conn, self._decoder
        assert conn is not None and dec is not None
        try:
            data, ancdata, flags, _ = conn.recvmsg(MAX_MESSAGE_SIZE, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("frontend connection failed: %s", e)
            self._detach()
            return
        fds = _recv_fds(ancdata)
        if not data and not fds:
            if dec.pending_bytes:
                log.warning("frontend hung up in the middle of a message (%d bytes pending)", dec.pending_bytes)
            else:
                log.info("frontend disconnected")
            self._detach()
            return
        try:
            if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
                for fd in fds:
                    os.close(fd)
                raise _FrontendFault(f"a message carried more than {MAX_FDS} file descriptors")
            dec.feed(data, fds)
            while self.conn is not None:
                msg = dec.next_message()
                if msg is None:
                    break
                self._dispatch(conn, msg)
        except (ProtocolError, _FrontendFault) as e:
            # Keep the message, not the frames: a chained error's traceback
            # would keep a half-built ring's views of guest memory alive.
            e.__traceback__ = e.__context__ = e.__cause__ = None
            self.last_error = e if isinstance(e, ProtocolError) else None
            log.error("frontend protocol error, closing the connection: %s", e)
            self._detach()

    def _dispatch(self, conn: socket.socket, msg: Message) -> None:
        try:
            reply = self.backend.handle(msg)
        except ProtocolError:
            raise
        except Exception:  # our bug (LocalProtocolError included): drop this frontend, keep serving
            log.exception("back-end failure while handling %s; closing the connection", _name(msg.request))
            self._detach()
            return
        if reply is None:
            return
        data, fds = reply
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        view = memoryview(data)
        try:
            while view:  # one sendmsg normally; a send with a timeout may be partial
                n = conn.sendmsg([view], anc)
                view, anc = view[n:], []
        except OSError as e:  # TimeoutError included: the front-end is not reading its replies
            log.warning("sending the reply to %s failed (is the front-end reading its replies?): %s",
                        _name(msg.request), e)
            self._detach()


class _FrontendFault(Exception):
    """A transport-level frontend fault the codec cannot see (fd oversupply)."""


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return str(request)
