"""Write the seed corpus: valid rings (from the driver model) and valid
vhost-user messages (from the codec's encoders), in the input formats of
`fuzz.targets`. Deterministic: `python -m fuzz.make_corpus` rewrites the
same files.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _write(target: str, blobs: list[bytes]) -> int:
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for b in blobs:
        (d / hashlib.sha1(b).hexdigest()[:16]).write_bytes(b)
    return len(blobs)


def ring_seeds() -> list[bytes]:
    from fuzz.targets import MEM_SIZE, PACKED_SIZES, RING_BASE, SPLIT_SIZES, ring_layout_for
    from pyvirtio.driver import BufferPool, PackedDriver, QueueFullError, SplitDriver
    from pyvirtio.memory import GuestMemory, Region

    out = []
    for packed in (False, True):
        sizes = PACKED_SIZES if packed else SPLIT_SIZES
        for size in (1, 4, 16) + ((7,) if packed else ()):
            for event_idx in (False, True):
                for indirect in (False, True):
                    for start in ((0xFFFE if not packed else 2 * size - 1) if event_idx else 0,):
                        buf = bytearray(MEM_SIZE)
                        mem = GuestMemory([Region.from_buffer(buf, 0)])
                        desc, drv, dev, end = ring_layout_for(packed, size)
                        pool_base = (end + 63) & ~63
                        pool = BufferPool(mem, pool_base, 0x400)
                        cls = PackedDriver if packed else SplitDriver
                        d = cls(mem, size, desc, drv, dev, event_idx=event_idx, indirect=indirect, pool=pool,
                                start_index=start)
                        for i in range(min(size, 6)):
                            nseg = 1 + i % 3
                            if not indirect and nseg > size:
                                nseg = 1
                            outs = [(pool.alloc(16), 16) for _ in range(i % 2 + (nseg > 1))]
                            ins = [(pool.alloc(16), 16)] if i % 3 else []
                            try:
                                d.add(outs or [(pool.alloc(8), 8)], ins, i, indirect=indirect and i % 2 == 1)
                            except QueueFullError:  # ring full: enough
                                break
                        d.publish()
                        image = bytes(buf[RING_BASE:pool_base + 0x400])
                        flags = (1 if packed else 0) | (2 if event_idx else 0) | (4 if indirect else 0)
                        for extra in (0, 16, 8):  # split/packed pop_batch, pop_bulk, eager
                            head = struct.pack("<BBHBH", flags | extra, sizes.index(size), start, size - 1,
                                               len(image))
                            writes = struct.pack("<HH", (drv - RING_BASE) + 2, 0xFFFF) if extra == 8 else b""
                            out.append(head + image + writes)
    return out


def codec_seeds() -> list[bytes]:
    from pyvirtio.vhost_user import (
        Config,
        Features,
        InflightInfo,
        MemoryRegion,
        MemRegMsg,
        Request,
        SetMemTable,
        Status,
        VringAddr,
        VringAddrFlags,
        VringFd,
        VringState,
        encode_request,
        encode_u64_reply,
    )

    msgs: list[tuple[bytes, int]] = []
    regions = tuple(MemoryRegion(i << 20, 1 << 20, 0x7F00_0000_0000 + (i << 20), 0) for i in range(2))
    for req, body in [
        (Request.GET_FEATURES, None), (Request.SET_FEATURES, Features((1 << 32) | (1 << 30))),
        (Request.SET_OWNER, None), (Request.GET_PROTOCOL_FEATURES, None),
        (Request.SET_PROTOCOL_FEATURES, Features(0x1000B)), (Request.GET_QUEUE_NUM, None),
        (Request.SET_MEM_TABLE, SetMemTable(regions, (0, 0))),
        (Request.SET_VRING_NUM, VringState(0, 256)), (Request.SET_VRING_BASE, VringState(1, 0)),
        (Request.SET_VRING_ADDR, VringAddr(0, VringAddrFlags(0), 0x7F00_0000_1000, 0x7F00_0000_3000,
                                           0x7F00_0000_2000, 0)),
        (Request.SET_VRING_KICK, VringFd(0, 0, False)), (Request.SET_VRING_CALL, VringFd(1, None, True)),
        (Request.SET_VRING_ENABLE, VringState(0, 1)), (Request.GET_VRING_BASE, VringState(1, 0)),
        (Request.GET_CONFIG, Config(0, 12, 0, bytes(12))), (Request.SET_STATUS, Status(0x0F)),
        (Request.ADD_MEM_REG, MemRegMsg(regions[0], 0)), (Request.REM_MEM_REG, MemRegMsg(regions[0])),
        (Request.GET_INFLIGHT_FD, InflightInfo(0, 0, 2, 128)),
        (Request.SET_INFLIGHT_FD, InflightInfo(4096, 0, 2, 128, 0)),
    ]:
        data, fds = encode_request(req, body, need_reply=req == Request.SET_MEM_TABLE)
        msgs.append((data, len(fds)))

    def chunks(parts: list[tuple[bytes, int]]) -> bytes:
        out = b""
        for data, nfds in parts:
            for i in range(0, max(len(data), 1), 255):  # one chunk per <= 255 bytes, fds on the first
                piece = data[i:i + 255]
                out += bytes([len(piece), nfds if i == 0 else 0]) + piece
        return out

    seeds = [bytes([(2 << 1), 0]) + chunks([m]) for m in msgs]  # each message alone, max_queues 2
    seeds.append(bytes([0, 0]) + chunks(msgs))  # a whole session
    split = [(m[0][:5], 0) for m in msgs[:4]] + [(m[0][5:], m[1]) for m in msgs[:4]]
    seeds.append(bytes([(8 << 1), 0]) + chunks(split))  # headers split across reads
    replies = [encode_u64_reply(Request.GET_FEATURES, 1 << 30), encode_u64_reply(Request.GET_QUEUE_NUM, 1)]
    seeds.append(bytes([1, Request.GET_FEATURES]) + chunks([(replies[0], 0)]))
    seeds.append(bytes([1, 0]) + chunks([(r, 0) for r in replies]))
    return seeds


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    logging.getLogger("pyvirtio").setLevel(logging.CRITICAL)  # retired queues are expected here
    n = _write("ring", ring_seeds())
    m = _write("codec", codec_seeds())
    print(f"seed corpus: {n} ring inputs, {m} codec inputs under {HERE / 'corpus'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
