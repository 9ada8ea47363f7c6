"""The ring hand-over with a real guest: QEMU 7.2 stops and restarts our
rings (QMP `stop`/`cont`: GET_VRING_BASE, then SET_VRING_BASE with the
answer) again and again while the guest writes through several writers with
requests of different sizes that the back-end completes out of order (an
I/O pool, injected latency). Nothing may be lost, repeated or completed
twice: every region reads back, no guest I/O error, and no "is not a head"
complaint from the guest's virtio ring.

Deselected by default (root, QEMU, a kernel); run with

    .venv/bin/pytest -m guest tests/test_guest_handover.py -s
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from guest_support import missing_requirements
from pyvirtio.bench.harness import Guest, vhost_user_blk_args
from pyvirtio.bench.harness.qmp import QMP
from test_guest_blk import REGION, VERIFY, _blk_backend, _exit_stats, _image, _writer_script, cleanup  # noqa: F401

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_stop_cont_cycles_during_out_of_order_writes_lose_and_repeat_nothing(
        tmp_path: Path, cleanup: list[object], ring: str, request: pytest.FixtureRequest) -> None:  # noqa: F811
    t0 = time.monotonic()
    nregions = 48
    image = _image(tmp_path, nregions * REGION)
    be = _blk_backend(tmp_path, image, "--inject-latency-ms", "3", "--io-threads", "3")
    cleanup.append(be)
    be.start()
    qmp_dir = tempfile.mkdtemp(prefix="pvq-")  # short: a socket path has at most 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(qmp_dir, ignore_errors=True))
    qmp_path = f"{qmp_dir}/qmp.sock"
    extra = {"packed": True} if ring == "packed" else {}
    guest = Guest(device_args=vhost_user_blk_args(be.sock, num_queues=1, extra=extra), log_dir=tmp_path,
                  extra_args=["-qmp", f"unix:{qmp_path},server=on,wait=off"])
    cleanup.append(guest)
    cycles: list[float] = []
    problems: list[str] = []
    stop = threading.Event()

    def stopper() -> None:
        try:
            with QMP(qmp_path) as qmp:
                while not stop.wait(0.25):
                    qmp.command("stop")
                    if qmp.command("query-status")["running"]:
                        problems.append("the VM still runs after stop")
                    time.sleep(0.05)
                    qmp.command("cont")
                    cycles.append(time.monotonic())
        except Exception as e:  # noqa: BLE001 (reported by the test, not lost in the thread)
            problems.append(f"QMP: {e!r}")

    with guest:
        guest.check("dd if=/dev/urandom of=/tmp/pat bs=1M count=7 2>/dev/null")
        end = int(float(guest.check("cut -d' ' -f1 /proc/uptime"))) + 15
        t = threading.Thread(target=stopper, name="stop-cont", daemon=True)
        t.start()
        try:
            script = _writer_script(end).replace("$r -lt 96", f"$r -lt {nregions}")
            rc, out = guest.run(script, timeout=240)
        finally:
            stop.set()
            t.join(30)
        assert not t.is_alive()
        assert rc == 0 and "writers-done" in out, out
        bad = [line for line in out.splitlines() if re.match(r"[WRV]FAIL", line)]
        verify = guest.check(VERIFY, timeout=240)
        dmesg = guest.check("dmesg | grep -i -E 'I/O error|blk_update_request|is not a head|virtio.*error' "
                            "|| true")
    be.stop()
    regions = [tuple(map(int, line.split()[1:])) for line in verify.splitlines() if line.startswith("region")]
    lost = sum(r[1] for r in regions)
    corrupt = sum(r[2] for r in regions)
    text = be.text()
    starts = text.count("started (")
    pooled = _exit_stats(text).get("requests", {}).get("pooled", 0)
    print(f"\n{ring}: {len(cycles)} stop/cont cycles, {starts} ring starts, {len(regions)} MiB written and "
          f"verified, {pooled} requests overlapped in the I/O pool, lost {lost} B, corrupt {corrupt} B, "
          f"guest errors {len(bad)}; "
          f"test time {time.monotonic() - t0:.1f} s")
    assert not problems, problems
    assert len(cycles) >= 10
    assert starts >= len(cycles) // 2, "QEMU did not stop and restart the ring on stop/cont"
    assert len(regions) >= 8
    assert pooled > 0, "no request overlapped another: nothing could complete out of order"
    assert bad == [] and dmesg == "", (bad, dmesg)
    assert lost == 0 and corrupt == 0
    assert "still in flight" not in text
