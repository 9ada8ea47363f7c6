"""virtio-rng (virtio 1.2 5.4): entropy for the guest from a host source.

The smallest useful device, written only against the public API
(`pyvirtio.Device`). One request queue; every request is a set of
device-writable buffers that the device fills from the source, answering
with the number of bytes it wrote.

The source is opened non-blocking. /dev/urandom always has bytes; a slow
source (a FIFO, a hardware RNG) gets `max_wait` seconds to produce the
first byte, and the request is answered with whatever it had: fewer bytes
than asked, or none at all (legal, and the queue keeps working), so the
queue's thread never waits on the source for longer than that. A file
answers with 0 bytes once it is read to the end. Beware: Linux 6.1's
virtio_rng driver never asks again after a zero-byte answer (seen in the
guest: it stays stuck until the module is reloaded), so a source that
runs dry starves that guest.

`max_bytes_per_second` emulates a slow hardware RNG (a token bucket with
one second of burst); a request waits at most one second for its share.
"""

from __future__ import annotations

import logging
import os
import select
import time

import pyvirtio

log = logging.getLogger(__name__)

#: the most bytes one request gets (a guest may post a 4 GiB chain)
MAX_REQUEST = 1 << 20


class RngDevice(pyvirtio.Device):
    """virtio-rng serving the bytes of `source` (a path)."""

    device_id = "rng"
    num_queues = 1  # the request queue

    def __init__(self, source: str = "/dev/urandom", *, max_bytes_per_second: int = 0,
                 max_wait: float = 1.0) -> None:
        self.fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.ready = select.poll()
        self.ready.register(self.fd, select.POLLIN)
        self.max_wait = max_wait
        self.rate = _TokenBucket(max_bytes_per_second) if max_bytes_per_second > 0 else None

    def handle(self, queue: int, chain: pyvirtio.Chain) -> int:
        """One request: fill its device-writable buffers; return the bytes written."""
        want = min(chain.writable_len, MAX_REQUEST)
        if want and self.rate is not None:
            want = self.rate.take(want)
        return chain.write(self.read(want)) if want else 0

    def read(self, n: int) -> bytes:
        """Up to `n` bytes of the source; waits at most `max_wait` for the first one."""
        if not self.ready.poll(int(self.max_wait * 1000)):
            log.debug("no bytes from the source within %gs: answering with none", self.max_wait)
            return b""
        try:
            return os.read(self.fd, n)  # fewer if that is all there is; b"" at the end of a file
        except BlockingIOError:  # another reader of the source was faster
            return b""

    def close(self) -> None:
        os.close(self.fd)


class _TokenBucket:
    """`rate` bytes a second, with a burst of one second's worth."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def take(self, want: int) -> int:
        """Wait until `want` (at most `rate`) bytes may go; returns how many."""
        want = min(want, self.rate)
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < want:
            time.sleep((want - self.tokens) / self.rate)
            self.tokens = float(want)
            self.stamp = time.monotonic()
        self.tokens -= want
        return want
