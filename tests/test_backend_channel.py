"""The back-end request channel (SET_BACKEND_REQ_FD), blk online resize and
RESET_DEVICE, driven by Python front-ends in this process: the channel is
negotiated, CONFIG_CHANGE_MSG arrives after a resize and is acked (after a
GET_CONFIG round trip on the main socket, as QEMU 7.2 does), a front-end
that never acks costs a logged timeout and nothing else, GET_CONFIG shows
the new capacity, the control socket and `pyvirtio blk-ctl` work, and
RESET_DEVICE is offered and returns the device to its initial state."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.control import BlkControl, ControlServer, request
from pyvirtio.device import Device, as_virtio_device
from pyvirtio.devices.blk import BLK_CONFIG, S_IOERR, S_OK, T_IN, T_OUT, BlkDevice, ResizeError
from pyvirtio.driver import SplitDriver, ring_layout
from pyvirtio.driver.frontend import BackendChannelEnd, VhostUserFrontend
from pyvirtio.queue import Chain
from pyvirtio.vhost_user import (
    U64,
    BackendProtocolError,
    BackendReplyDecoder,
    BackendReqFd,
    BackendRequest,
    BackendRequestDecoder,
    Config,
    Features,
    FrontendProtocolError,
    HeaderFlag,
    LocalProtocolError,
    Message,
    ProtocolFeature,
    Request,
    Status,
    VringAddr,
    VringAddrFlags,
    VringFd,
    VringState,
    backend_request_flags,
    encode_backend_ack,
    encode_backend_request,
    encode_frame,
)
from pyvirtio.vhost_user.backend import Backend
from pyvirtio.vhost_user.channel import Outcome
from pyvirtio.vhost_user.server import Server
from test_blk_device import BlkFrontend, image
from vhost_client import UVA_BASE, Client

MiB = 1 << 20
SECTORS_PER_MIB = MiB // 512


# --- the codec ----------------------------------------------------------------------------------


def test_config_change_msg_round_trips_through_the_channel_codecs() -> None:
    wire = encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    assert wire == encode_frame(2, 0x9)  # request 2, VERSION|NEED_REPLY, no payload
    dec = BackendRequestDecoder()
    dec.feed(wire)
    msg = dec.next_message()
    assert msg is not None and msg.request is BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
    assert msg.body is None
    ack = encode_backend_ack(msg)
    assert ack == encode_frame(2, 0x5, (0).to_bytes(8, "little"))  # what QEMU 7.2 answers
    rdec = BackendReplyDecoder()
    rdec.feed(ack)
    reply = rdec.next_message(expect=BackendRequest.CONFIG_CHANGE_MSG)
    assert reply is not None and reply.body == U64(0)
    assert backend_request_flags(ProtocolFeature.REPLY_ACK) == HeaderFlag.VERSION | HeaderFlag.NEED_REPLY
    assert backend_request_flags(0) == HeaderFlag.VERSION


def test_channel_codecs_refuse_what_the_protocol_forbids() -> None:
    with pytest.raises(LocalProtocolError):
        encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, b"x")
    with pytest.raises(LocalProtocolError):
        encode_backend_ack(Message(BackendRequest.CONFIG_CHANGE_MSG, HeaderFlag.VERSION, None))
    dec = BackendRequestDecoder()
    dec.feed(encode_frame(2, 0x1, b"12345678"))  # CONFIG_CHANGE_MSG with a payload
    with pytest.raises(BackendProtocolError):
        dec.next_message()
    rdec = BackendReplyDecoder()
    rdec.feed(encode_frame(2, 0xD, bytes(8)))  # a reply with NEED_REPLY still set
    with pytest.raises(FrontendProtocolError):
        rdec.next_message()


# --- serving --------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving_blk(tmp_path: Path, path: str, *, channel_timeout: float = 5.0,
                **kw: Any) -> Iterator[tuple[str, BlkDevice, Backend]]:
    dev = BlkDevice(path, io_threads=0, **kw)
    be = Backend(dev, channel_timeout=channel_timeout)
    sock = str(tmp_path / "blk.sock")
    srv = Server(be, socket_path=sock)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield sock, dev, be
    finally:
        srv.stop()
        t.join(10)
        assert not t.is_alive()
        be.close()


def capacity(c: Client) -> int:
    cfg = c.call(Request.GET_CONFIG, Config(0, 60, 0, bytes(60))).body
    assert isinstance(cfg, Config)
    return int(BLK_CONFIG.unpack(cfg.payload + bytes(BLK_CONFIG.size - 60))[0])


class QemuLikeChannel(BackendChannelEnd):
    """A channel end that answers CONFIG_CHANGE_MSG as QEMU 7.2 does: GET_CONFIG
    on the main socket first, then the ack (`answer=False`: never acks)."""

    def __init__(self, client: Client, *, answer: bool = True) -> None:
        super().__init__(self._on_request, answer=answer)
        self.client = client
        self.capacities: list[int] = []

    def _on_request(self, msg: Message) -> bool:
        if msg.request == BackendRequest.CONFIG_CHANGE_MSG:
            self.capacities.append(capacity(self.client))
            return True
        return False

    def attach(self) -> None:
        ack = self.client.call(Request.SET_BACKEND_REQ_FD, BackendReqFd(self.theirs.fileno()), need_reply=True)
        assert ack.body == U64(0)
        self.release_theirs()


@contextlib.contextmanager
def blk_with_channel(sock: str, *, answer: bool = True) -> Iterator[tuple[BlkFrontend, QemuLikeChannel]]:
    fe = BlkFrontend(sock, proto_extra=ProtocolFeature.BACKEND_REQ, inflight=False)
    try:
        fe.connect()
        assert fe.client is not None
        ch = QemuLikeChannel(fe.client, answer=answer)
        try:
            ch.attach()
            yield fe, ch
        finally:
            ch.close()
    finally:
        fe.close()


def grow(path: str, by: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size + by)


# --- negotiation ----------------------------------------------------------------------------------


def test_backend_req_and_reset_device_are_offered_with_reply_ack(tmp_path: Path) -> None:
    with serving_blk(tmp_path, image(tmp_path)) as (sock, _dev, _be):
        c = Client(sock)
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
        for bit in (ProtocolFeature.BACKEND_REQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.RESET_DEVICE,
                    ProtocolFeature.CONFIG):
            assert proto & bit, bit
        c.close()


class TwoQueuesWithConfig(Device):
    """Any device with a config space (the Python front-end sets up two rings)."""

    device_id = "cfg"
    num_queues = 2

    def config(self) -> bytes:
        return b"\x01" * 8

    def handle(self, queue: int, chain: Chain) -> int:
        return 0


def test_the_python_frontend_negotiates_the_channel_and_acks_a_config_change(tmp_path: Path) -> None:
    dev = as_virtio_device(TwoQueuesWithConfig())
    be = Backend(dev)
    sock = str(tmp_path / "net.sock")
    srv = Server(be, socket_path=sock)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with VhostUserFrontend(sock, backend_channel=True) as fe:
            assert fe.protocol_features is not None and fe.protocol_features & ProtocolFeature.BACKEND_REQ
            assert fe.channel is not None
            assert be.channel is not None and be.channel.need_reply
            notice = dev.config_changed()
            got = fe.poll_backend(5.0)
            assert [m.request for m in got] == [BackendRequest.CONFIG_CHANGE_MSG] and got[0].need_reply
            assert notice.wait(5.0) is Outcome.ACKED  # type: ignore[attr-defined]
            assert be.stats()["backend_channel"]["acked"] == 1
    finally:
        srv.stop()
        t.join(10)
        be.close()


def test_set_backend_req_fd_without_backend_req_is_refused_and_the_connection_kept(tmp_path: Path) -> None:
    with serving_blk(tmp_path, image(tmp_path)) as (sock, _dev, be):
        c = Client(sock)
        proto = c.call(Request.GET_PROTOCOL_FEATURES).body.value  # type: ignore[union-attr]
        c.send(Request.SET_PROTOCOL_FEATURES, Features(proto & ~ProtocolFeature.BACKEND_REQ))
        a, b = socket.socketpair()
        assert c.call(Request.SET_BACKEND_REQ_FD, BackendReqFd(b.fileno()), need_reply=True).body == U64(1)
        a.close()
        b.close()
        assert be.channel is None
        assert c.call(Request.GET_QUEUE_NUM).body.value == 8  # type: ignore[union-attr]
        c.close()


# --- resize ---------------------------------------------------------------------------------------


def test_a_grown_image_reaches_the_driver_with_an_acked_config_change(tmp_path: Path) -> None:
    """The operator grows the image and calls resize: CONFIG_CHANGE_MSG with
    NEED_REPLY arrives, the front-end re-reads the config on the main socket
    before acking (the back-end must keep serving it while it waits), the
    ack completes the notice, and the new sectors are readable and writable."""
    path = image(tmp_path, 4 * MiB)
    with serving_blk(tmp_path, path) as (sock, dev, be), blk_with_channel(sock) as (fe, ch):
        assert fe.client is not None
        assert capacity(fe.client) == 4 * SECTORS_PER_MIB
        assert fe.do(T_IN, 4 * SECTORS_PER_MIB, in_len=512)[0] == S_IOERR  # past the end
        grow(path, 64 * MiB)
        with ThreadPoolExecutor(1) as pool:  # the operator's side: resize and wait for the guest's ack
            fut = pool.submit(lambda: dev.resize())
            msgs = ch.poll(5.0)
            result = fut.result(5.0)
        assert [(m.request, m.need_reply) for m in msgs] == [(BackendRequest.CONFIG_CHANGE_MSG, True)]
        assert (result.old_capacity, result.capacity) == (4 * SECTORS_PER_MIB, 68 * SECTORS_PER_MIB)
        assert result.notice.wait(5.0) is Outcome.ACKED  # type: ignore[attr-defined]
        assert ch.capacities == [68 * SECTORS_PER_MIB] and ch.acks_sent == 1
        assert capacity(fe.client) == 68 * SECTORS_PER_MIB
        end = 68 * SECTORS_PER_MIB - 8
        assert fe.do(T_OUT, end, b"\xa5" * 4096)[0] == S_OK
        assert fe.do(T_IN, end, in_len=4096) == (S_OK, b"\xa5" * 4096)
        stats = be.stats()
        assert stats["capacity_sectors"] == 68 * SECTORS_PER_MIB and stats["resizes"] == 1
        assert stats["backend_channel"]["up"] and stats["backend_channel"]["acked"] == 1


def test_a_frontend_that_never_acks_costs_a_logged_timeout_and_nothing_else(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pyvirtio")
    path = image(tmp_path, 4 * MiB)
    with (serving_blk(tmp_path, path, channel_timeout=0.3) as (sock, dev, be),
          blk_with_channel(sock, answer=False) as (fe, ch)):
        assert fe.client is not None
        start = time.monotonic()
        result = dev.resize(8 * MiB)
        assert result.capacity == 8 * SECTORS_PER_MIB and os.path.getsize(path) == 8 * MiB
        notice = result.notice
        # while the ack is awaited the main socket is served
        assert fe.client.call(Request.GET_FEATURES).body.value  # type: ignore[union-attr]
        assert notice.wait(5.0) is Outcome.TIMEOUT  # type: ignore[attr-defined]
        assert 0.25 <= time.monotonic() - start < 3.0
        assert [m.request for m in ch.poll(1.0)] == [BackendRequest.CONFIG_CHANGE_MSG] and ch.acks_sent == 0
        assert any("no ack to CONFIG_CHANGE_MSG" in r.getMessage() for r in caplog.records)
        # the back-end carries on: config, I/O past the old end, a second notification
        assert capacity(fe.client) == 8 * SECTORS_PER_MIB
        assert fe.do(T_OUT, 8 * SECTORS_PER_MIB - 1, b"\x11" * 512)[0] == S_OK
        assert dev.resize(12 * MiB).notice.wait(5.0) is Outcome.TIMEOUT  # type: ignore[attr-defined]
        assert be.stats()["backend_channel"]["timeouts"] == 2


def test_a_late_ack_after_a_timeout_is_dropped(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pyvirtio")
    path = image(tmp_path, 4 * MiB)
    with (serving_blk(tmp_path, path, channel_timeout=0.2) as (sock, dev, be),
          blk_with_channel(sock, answer=False) as (fe, ch)):
        assert dev.resize(5 * MiB).notice.wait(5.0) is Outcome.TIMEOUT  # type: ignore[attr-defined]
        (msg,) = ch.poll(1.0)
        ch._sock.sendall(encode_backend_ack(msg))  # the ack, too late
        deadline = time.monotonic() + 5
        while be.stats()["backend_channel"]["late_acks"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert be.stats()["backend_channel"]["late_acks"] == 1
        assert fe.client is not None and capacity(fe.client) == 5 * SECTORS_PER_MIB


def test_a_channel_the_frontend_closes_is_dropped_and_the_connection_goes_on(tmp_path: Path) -> None:
    path = image(tmp_path, 4 * MiB)
    with serving_blk(tmp_path, path) as (sock, dev, be), blk_with_channel(sock) as (fe, ch):
        assert fe.client is not None
        ch.close()  # the front-end's end of the channel goes away
        deadline = time.monotonic() + 5
        while be.stats()["backend_channel"]["up"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not be.stats()["backend_channel"]["up"]
        assert dev.resize(5 * MiB).notice.wait(0) is Outcome.NO_CHANNEL  # type: ignore[attr-defined]
        assert capacity(fe.client) == 5 * SECTORS_PER_MIB
        assert fe.do(T_OUT, 5 * SECTORS_PER_MIB - 1, b"\x33" * 512)[0] == S_OK


def test_without_a_channel_a_resize_is_logged_and_the_config_still_changes(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pyvirtio")
    path = image(tmp_path, 4 * MiB)
    with serving_blk(tmp_path, path) as (sock, dev, _be):
        fe = BlkFrontend(sock, inflight=False)
        try:
            fe.connect()
            grow(path, MiB)
            result = dev.resize()
            assert result.notice.wait(0) is Outcome.NO_CHANNEL  # type: ignore[attr-defined]
            assert any("set up no back-end channel" in r.getMessage() for r in caplog.records)
            assert fe.client is not None and capacity(fe.client) == 5 * SECTORS_PER_MIB
        finally:
            fe.close()


def test_a_resize_while_no_ring_runs_is_told_when_the_driver_starts_one(tmp_path: Path) -> None:
    """A guest rebooting (QEMU stops the rings with GET_VRING_BASE): the
    config change is deferred, then sent once the ring starts again, so that
    QEMU 7.2 (which ignores it for a stopped device) re-reads the config."""
    path = image(tmp_path, 4 * MiB)
    with serving_blk(tmp_path, path) as (sock, dev, be), blk_with_channel(sock) as (fe, ch):
        c = fe.client
        assert c is not None
        c.call(Request.GET_VRING_BASE, VringState(0, 0))
        result = dev.resize(6 * MiB)
        assert result.notice.wait(0) is Outcome.DEFERRED  # type: ignore[attr-defined]
        assert ch.poll(0.3) == []
        c.send(Request.SET_VRING_KICK, VringFd(0, fe.kick, False))  # the driver starts again
        assert [m.request for m in ch.poll(5.0)] == [BackendRequest.CONFIG_CHANGE_MSG]
        assert ch.capacities == [6 * SECTORS_PER_MIB]
        deadline = time.monotonic() + 5
        while be.stats()["backend_channel"]["acked"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert be.stats()["backend_channel"]["acked"] == 1 and be.stats()["backend_channel"]["deferred"] == 1
        assert fe.do(T_OUT, 6 * SECTORS_PER_MIB - 1, b"\x22" * 512)[0] == S_OK


def test_shrinking_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = image(tmp_path, 8 * MiB)
    dev = BlkDevice(path, io_threads=0)
    try:
        with pytest.raises(ResizeError, match="shrinking from 8388608 to 4194304 bytes is refused"):
            dev.resize(4 * MiB)
        os.truncate(path, 2 * MiB)  # the operator shrank the file under a running disk
        with pytest.raises(ResizeError, match="shrank"):
            dev.resize()
        assert dev.capacity == 8 * SECTORS_PER_MIB
        with pytest.raises(ResizeError, match="multiple"):
            dev.resize(16 * MiB + 100)
        assert dev.resize(8 * MiB).changed is False
    finally:
        dev.close()


def test_the_control_socket_resizes_reports_stats_and_refuses_bad_commands(tmp_path: Path) -> None:
    path = image(tmp_path, 4 * MiB)
    ctl_path = str(tmp_path / "ctl.sock")
    with serving_blk(tmp_path, path) as (sock, dev, be), blk_with_channel(sock) as (fe, ch):
        ctl = ControlServer(ctl_path, BlkControl(dev).bind(be))
        try:
            assert oct(os.stat(ctl_path).st_mode & 0o777) == "0o600"
            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(request, ctl_path, {"cmd": "resize", "size": 32 * MiB})
                ch.poll(5.0)
                answer = fut.result(10)
            assert answer == {"ok": True, "old_capacity": 4 * SECTORS_PER_MIB, "capacity": 32 * SECTORS_PER_MIB,
                              "size": 32 * MiB, "changed": True, "notified": "acked"}
            assert os.path.getsize(path) == 32 * MiB
            assert request(ctl_path, {"cmd": "resize"})["notified"] == "unchanged"
            bad = request(ctl_path, {"cmd": "resize", "size": 16 * MiB})
            assert bad["ok"] is False and "shrinking" in bad["error"]
            assert request(ctl_path, {"cmd": "stats"})["stats"]["capacity_sectors"] == 32 * SECTORS_PER_MIB
            assert request(ctl_path, {"cmd": "nope"})["ok"] is False
            assert request(ctl_path, {"size": 1})["ok"] is False
            assert fe.client is not None and capacity(fe.client) == 32 * SECTORS_PER_MIB
        finally:
            ctl.close()
        assert not os.path.exists(ctl_path)


def test_pyvirtio_blk_resizes_on_blk_ctl_and_on_sighup(tmp_path: Path) -> None:
    """The commands an operator runs: `pyvirtio blk --control-socket`,
    `pyvirtio blk-ctl ... resize --size`, and SIGHUP after `truncate`."""
    path = image(tmp_path, 4 * MiB)
    sock, ctl = str(tmp_path / "blk.sock"), str(tmp_path / "ctl.sock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "blk", "--blk-file", path, "--socket-path", sock,
                             "--control-socket", ctl, "--io-threads", "0", "--queues", "1"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(sock) and os.path.exists(ctl)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with blk_with_channel(sock) as (fe, ch):
            assert fe.client is not None
            cli = subprocess.Popen([sys.executable, "-m", "pyvirtio", "blk-ctl", "--control-socket", ctl, "resize",
                                    "--size", "16M"], env=env, stdout=subprocess.PIPE, text=True)
            assert [m.request for m in ch.poll(20.0)] == [BackendRequest.CONFIG_CHANGE_MSG]
            out, _ = cli.communicate(timeout=20)
            assert cli.returncode == 0
            assert json.loads(out)["notified"] == "acked" and json.loads(out)["capacity"] == 16 * SECTORS_PER_MIB
            grow(path, 16 * MiB)
            proc.send_signal(signal.SIGHUP)
            assert [m.request for m in ch.poll(20.0)] == [BackendRequest.CONFIG_CHANGE_MSG]
            assert ch.capacities == [16 * SECTORS_PER_MIB, 32 * SECTORS_PER_MIB]
            shrink = subprocess.run([sys.executable, "-m", "pyvirtio", "blk-ctl", "--control-socket", ctl, "resize",
                                     "--size", "1M"], check=False, env=env, capture_output=True, text=True,
                                    timeout=20)
            assert shrink.returncode == 1 and "shrinking" in shrink.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not os.path.exists(ctl)


# --- RESET_DEVICE -----------------------------------------------------------------------------------


def test_reset_device_stops_and_disables_every_ring_and_the_device_starts_again(tmp_path: Path) -> None:
    path = image(tmp_path, 4 * MiB)
    with serving_blk(tmp_path, path) as (sock, dev, be):
        fe = BlkFrontend(sock, inflight=False, proto_extra=ProtocolFeature.STATUS)
        try:
            fe.connect()
            c = fe.client
            assert c is not None
            assert c.call(Request.SET_STATUS, Status(0x0F), need_reply=True).body == U64(0)
            assert c.call(Request.SET_CONFIG, Config(32, 1, 0, b"\x00"), need_reply=True).body == U64(0)
            assert fe.do(T_OUT, 0, b"\x42" * 512)[0] == S_OK
            assert be.stats()["queues"][0]["running"]
            assert c.call(Request.RESET_DEVICE, need_reply=True).body == U64(0)
            q = be.stats()["queues"][0]
            assert not q["running"] and not q["enabled"]
            assert c.call(Request.GET_STATUS).body.value == 0  # type: ignore[union-attr]
            assert be.session.features == 0 and be.session.owner  # ownership survives
            assert dev.wce == 1 and not dev.loops  # device state back to its initial values
            assert c.call(Request.GET_VRING_BASE, VringState(0, 0)).body == VringState(0, 0)
            # the front-end sets the device up again on the same connection, from a fresh ring
            desc, drv, used = fe.addrs
            fe.mem.mem.write(desc, bytes(ring_layout(False, fe.queue_size, desc)[3] - desc))
            fe.driver = SplitDriver(fe.mem.mem, fe.queue_size, desc, drv, used, event_idx=fe.event_idx,
                                    indirect=fe.indirect, pool=fe.pool)
            c.send(Request.SET_FEATURES, Features(fe.features))
            assert c.call(Request.SET_MEM_TABLE, fe.mem.table(), need_reply=True).body == U64(0)
            c.send(Request.SET_VRING_NUM, VringState(0, fe.queue_size))
            c.send(Request.SET_VRING_BASE, VringState(0, 0))
            c.send(Request.SET_VRING_ADDR, VringAddr(0, VringAddrFlags(0), UVA_BASE + desc, UVA_BASE + used,
                                                     UVA_BASE + drv, 0))
            c.send(Request.SET_VRING_KICK, VringFd(0, fe.kick, False))
            assert c.call(Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True).body == U64(0)
            assert fe.do(T_IN, 0, in_len=512) == (S_OK, b"\x42" * 512)
            assert be.stats()["queues"][0]["starts"] == 2
        finally:
            fe.close()
