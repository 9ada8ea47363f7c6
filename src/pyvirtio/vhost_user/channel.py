"""The back-end request channel: the socket a front-end hands over with
SET_BACKEND_REQ_FD, on which the back-end speaks first.

The codec encodes the requests and decodes the answers; this module moves
them. One `BackendChannel` per connection (the `Backend` creates it from the
fd and closes it when the connection ends or the front-end replaces it).

Threads: `send()` may be called from any thread (a device's control thread
telling the driver its config changed). The server thread owns reading and
closing: it selects on `fileno()`, calls `on_readable()`, `expire()` at
`next_deadline()`, and `close()` once `closed` (a failed send only marks
the channel given up, so that no fd is closed under the server's selector). Nothing ever blocks: a request is written with a
non-blocking `sendmsg`, and with REPLY_ACK its ack is awaited by the server
loop, which keeps serving the main socket meanwhile. That matters: QEMU 7.2
answers a CONFIG_CHANGE_MSG only after a GET_CONFIG round trip on the main
socket, so a back-end that blocked its main loop on the ack would deadlock
until its timeout. A front-end that never answers costs a logged timeout.

Acks carry the request code and nothing else (no sequence number), so an
ack is matched to the oldest request waiting for one; an ack arriving after
its request timed out is logged and dropped.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.vhost_user.codec import (
    U64,
    BackendReplyDecoder,
    ProtocolError,
    encode_backend_request,
)
from pyvirtio.vhost_user.protocol import BackendRequest

log = logging.getLogger(__name__)

#: seconds a back-end request waits for its ack by default
ACK_TIMEOUT = 5.0


class Outcome(enum.Enum):
    """What became of one back-end request."""

    PENDING = "pending"        #: sent, the ack has not come yet
    ACKED = "acked"            #: the front-end answered 0 (success)
    REFUSED = "refused"        #: the front-end answered non-zero
    SENT = "sent"              #: sent; no ack was asked (REPLY_ACK not negotiated)
    TIMEOUT = "timeout"        #: no ack within the timeout
    FAILED = "failed"          #: could not be sent (the front-end does not read its channel, or it closed)
    NO_CHANNEL = "no-channel"  #: the front-end set up no back-end channel (BACKEND_REQ not negotiated)
    DEFERRED = "deferred"      #: no ring runs (no driver): sent when the driver starts a ring


_FINAL = frozenset(Outcome) - {Outcome.PENDING}


@dataclass(eq=False)
class Notice:
    """One back-end request and its outcome; `wait()` blocks until it is final."""

    request: int
    outcome: Outcome = Outcome.PENDING
    sent_at: float = field(default_factory=time.monotonic)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def finish(self, outcome: Outcome) -> None:
        if self.outcome is Outcome.PENDING:
            self.outcome = outcome
            self._done.set()

    def wait(self, timeout: float | None = None) -> Outcome:
        """The outcome once final, or PENDING if `timeout` seconds pass first."""
        self._done.wait(timeout)
        return self.outcome

    @classmethod
    def final(cls, request: int, outcome: Outcome) -> Notice:
        n = cls(request)
        n.finish(outcome)
        return n


@dataclass(slots=True)
class ChannelCounters:
    """What the channels of this back-end did (all connections)."""

    sent: int = 0
    acked: int = 0
    refused: int = 0
    timeouts: int = 0
    failed: int = 0
    late_acks: int = 0
    no_channel: int = 0
    deferred: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "acked": self.acked, "refused": self.refused, "timeouts": self.timeouts,
                "failed": self.failed, "late_acks": self.late_acks, "no_channel": self.no_channel,
                "deferred": self.deferred}

    def count(self, outcome: Outcome) -> None:
        if outcome is Outcome.ACKED:
            self.acked += 1
        elif outcome is Outcome.REFUSED:
            self.refused += 1
        elif outcome is Outcome.TIMEOUT:
            self.timeouts += 1
        elif outcome is Outcome.FAILED:
            self.failed += 1
        elif outcome is Outcome.NO_CHANNEL:
            self.no_channel += 1
        elif outcome is Outcome.DEFERRED:
            self.deferred += 1


def _name(request: int) -> str:
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"back-end request {request}"


class BackendChannel:
    """The back-end -> front-end socket of one connection.

    `fd`: the socket from SET_BACKEND_REQ_FD (owned from now on);
    `need_reply`: REPLY_ACK was negotiated, so every request asks for an ack;
    `ack_timeout`: seconds to wait for one; `counters`: shared statistics.
    `on_change` (set by the server) is called from `send()`'s thread when a
    deadline appeared, so that the server loop recomputes its sleep.
    """

    def __init__(self, fd: int, *, need_reply: bool, ack_timeout: float = ACK_TIMEOUT,
                 counters: ChannelCounters | None = None) -> None:
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX:
            sock.detach()
            raise ValueError(f"fd {fd} is not a unix socket")
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self.need_reply = need_reply
        self.ack_timeout = ack_timeout
        self.counters = counters if counters is not None else ChannelCounters()
        self.on_change: Callable[[], None] | None = None
        self._fileno = sock.fileno()
        self._broken = False  # given up in `send` (another thread): the server thread closes it
        self._lock = threading.Lock()
        self._waiting: deque[Notice] = deque()
        self._decoder = BackendReplyDecoder()

    @property
    def closed(self) -> bool:
        """No longer usable (closed, or given up after a failed send)."""
        return self._sock is None or self._broken

    def fileno(self) -> int:
        """The socket's fd (still valid for unregistering after `close()`)."""
        return self._fileno

    # -- sending (any thread) ------------------------------------------------------------

    def send(self, request: BackendRequest, payload: bytes = b"") -> Notice:
        """Send one request; returns its `Notice` (final at once unless an ack is awaited)."""
        data = encode_backend_request(request, payload, need_reply=self.need_reply)
        with self._lock:
            outcome = self._send_locked(request, data)
            notice = Notice(request)
            if outcome is Outcome.PENDING:
                self._waiting.append(notice)
            else:
                notice.finish(outcome)
                self.counters.count(outcome)
            wake = outcome is Outcome.PENDING or self._broken
        if outcome is Outcome.PENDING:
            log.info("back-end channel: %s sent, waiting up to %gs for the ack", _name(request), self.ack_timeout)
        elif outcome is Outcome.SENT:
            log.info("back-end channel: %s sent (no ack asked: REPLY_ACK not negotiated)", _name(request))
        if wake and self.on_change is not None:
            self.on_change()  # a new deadline, or a channel for the server thread to close
        return notice

    def _send_locked(self, request: int, data: bytes) -> Outcome:
        sock = self._sock
        if sock is None or self._broken:
            return Outcome.NO_CHANNEL
        try:
            n = sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            log.warning("back-end channel: %s not sent: the front-end does not read its channel "
                        "(socket buffer full)", _name(request))
            return Outcome.FAILED
        except OSError as e:
            log.warning("back-end channel: %s not sent (%s); giving the channel up", _name(request), e)
            self._give_up_locked()
            return Outcome.FAILED
        if n != len(data):  # a torn message would desynchronise the stream
            log.warning("back-end channel: %s sent in part; giving the channel up", _name(request))
            self._give_up_locked()
            return Outcome.FAILED
        self.counters.sent += 1
        return Outcome.PENDING if self.need_reply else Outcome.SENT

    # -- the server thread ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When the oldest unanswered request times out (monotonic), or None."""
        with self._lock:
            return self._waiting[0].sent_at + self.ack_timeout if self._waiting else None

    def expire(self, now: float | None = None) -> None:
        """Time out every request whose ack is overdue (logged, never fatal)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._waiting and self._waiting[0].sent_at + self.ack_timeout <= now:
                notice = self._waiting.popleft()
                notice.finish(Outcome.TIMEOUT)
                self.counters.count(notice.outcome)
                log.warning("back-end channel: no ack to %s within %gs; carrying on (the front-end may not "
                            "have seen it)", _name(notice.request), self.ack_timeout)

    def on_readable(self) -> bool:
        """Read and match the front-end's answers. Returns False when the
        channel is finished (closed by the front-end, or a malformed answer):
        the caller unregisters it; the main connection goes on."""
        with self._lock:
            sock = self._sock
            if sock is None or self._broken:
                return False
            try:
                data, anc, _flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                log.warning("back-end channel: read failed (%s); closing it", e)
                self._close_locked()
                return False
            for level, kind, fds in anc:  # the acks carry no fds: close any
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for i in range(0, len(fds) - len(fds) % 4, 4):
                        os.close(int.from_bytes(fds[i:i + 4], "little"))
            if not data:
                log.info("back-end channel closed by the front-end")
                self._close_locked()
                return False
            try:
                self._decoder.feed(data)
                while True:
                    msg = self._decoder.next_message()
                    if msg is None:
                        break
                    self._match_locked(msg.request, msg.body)
            except ProtocolError as e:
                log.warning("back-end channel: bad answer from the front-end (%s); closing the channel", e)
                self._close_locked()
                return False
            return True

    def _match_locked(self, request: int, body: object) -> None:
        for notice in self._waiting:
            if notice.request == request:
                self._waiting.remove(notice)
                ok = isinstance(body, U64) and body.value == 0
                notice.finish(Outcome.ACKED if ok else Outcome.REFUSED)
                self.counters.count(notice.outcome)
                took = time.monotonic() - notice.sent_at
                if ok:
                    log.info("back-end channel: %s acked after %.3fs", _name(request), took)
                else:
                    log.warning("back-end channel: the front-end refused %s (%r)", _name(request), body)
                return
        self.counters.late_acks += 1
        log.info("back-end channel: an answer to %s nobody waits for (late, after a timeout); dropped",
                 _name(request))

    # -- end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; requests still waiting end as FAILED. Idempotent."""
        with self._lock:
            self._close_locked()

    def _give_up_locked(self) -> None:
        # Not closed here: the fd may be registered in the server's selector,
        # and a number closed under it could come back as another socket.
        self._broken = True
        self._fail_waiting_locked()

    def _fail_waiting_locked(self) -> None:
        while self._waiting:
            notice = self._waiting.popleft()
            notice.finish(Outcome.FAILED)
            self.counters.count(notice.outcome)

    def _close_locked(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._decoder.close()
        self._fail_waiting_locked()


__all__ = ["ACK_TIMEOUT", "BackendChannel", "ChannelCounters", "Notice", "Outcome"]
