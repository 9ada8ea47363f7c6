#!/usr/bin/env python3
"""A RAM-backed virtio-blk disk, written only against pyvirtio's public API.

    python examples/ramdisk_blk.py --socket-path /tmp/ram.sock --size-mib 64
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
        -machine q35,memory-backend=mem -chardev socket,id=c,path=/tmp/ram.sock \\
        -device vhost-user-blk-pci,chardev=c,num-queues=1

Each request is a 16-byte header (type, reserved, sector), data, and a
status byte at the very end of the device-writable part (virtio 1.2 5.2.6).
"""

import argparse
import struct

import pyvirtio

SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SEG_MAX = 1 << 2  # VIRTIO_BLK_F_SEG_MAX: let the driver send many segments per request


class RamDisk(pyvirtio.Device):
    device_id = "ramdisk"
    features = pyvirtio.Device.features | SEG_MAX

    def __init__(self, size: int) -> None:
        self.disk = bytearray(size)

    def config(self) -> bytes:
        # capacity in sectors, size_max (not offered), seg_max; QEMU reads 57+ bytes
        return struct.pack("<QII", len(self.disk) // SECTOR, 0, 126).ljust(60, b"\0")

    def handle(self, queue: int, chain: pyvirtio.Chain) -> int:
        status_at = chain.writable_len - 1            # the last writable byte
        req = chain.read()
        if status_at < 0:
            return 0                                  # nowhere to put a status
        if len(req) < 16:
            return self.done(chain, S_IOERR)
        kind, _, sector = struct.unpack_from("<IIQ", req)
        start = sector * SECTOR
        if kind == T_IN and start + status_at <= len(self.disk):
            chain.write(memoryview(self.disk)[start:start + status_at])
        elif kind == T_OUT and start + len(req) - 16 <= len(self.disk):
            self.disk[start:start + len(req) - 16] = req[16:]
        elif kind == T_GET_ID:
            chain.write(b"pyvirtio-ramdisk"[:status_at])
        elif kind == T_FLUSH:
            pass                                      # RAM: nothing to flush
        elif kind in (T_IN, T_OUT):
            return self.done(chain, S_IOERR)          # past the end
        else:
            return self.done(chain, S_UNSUPP)
        return self.done(chain, S_OK)

    def done(self, chain: pyvirtio.Chain, status: int) -> int:
        chain.write(bytes([status]), chain.writable_len - 1)
        return chain.writable_len


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket-path", required=True)
    p.add_argument("--size-mib", type=int, default=64)
    args = p.parse_args()
    pyvirtio.serve(RamDisk(args.size_mib << 20), socket_path=args.socket_path)
