"""Build the tiny initramfs the test guest boots: busybox, iperf3, the virtio
modules and an /init that serves shell commands over the serial console.

/init loads the modules of `DEFAULT_MODULES` (virtio_pci, virtio_net,
virtio_blk and their dependencies) at boot; they sit under
/lib/modules/<version>/ with a modules.dep, so `rmmod virtio_net` and
`modprobe virtio_net` work in the guest (driver reload tests).

The image is a gzip'd cpio "newc" archive written by Python (no `cpio`,
`gzip` or `depmod` needed on the host). It is built once and cached under
`~/.cache/pyvirtio/`, keyed by the kernel version and a hash of everything
that goes into it (init script, module list, busybox and iperf3 files), so a
rebuild happens only when one of those changes.

The serial protocol spoken by /init (see `INIT_SCRIPT`):

* after boot it prints `@@PYVIRTIO-READY@@` on ttyS0;
* the host writes one line `<id> <shell command>`; the guest prints
  `@@PYVIRTIO-BEGIN <id>@@`, then the command's stdout and stderr, then
  `@@PYVIRTIO-DONE <id> <exit status>@@`;
* each command runs in a subshell of one persistent shell, with stdin from
  /dev/null (so `exit`, `cd` and variables do not leak into later commands);
* a command line must fit the tty's canonical line buffer (4095 bytes) and
  must not contain a newline.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Printed once by /init when the control loop is ready for commands.
READY_MARKER = "@@PYVIRTIO-READY@@"
#: `BEGIN_MARKER.format(id=...)` precedes a command's output.
BEGIN_MARKER = "@@PYVIRTIO-BEGIN {id}@@"
#: Matches the line that ends a command's output: group 1 is the id, group 2 the exit status.
DONE_RE = re.compile(r"@@PYVIRTIO-DONE (\S+) (-?\d+)@@")

#: Modules the guest loads (dependencies are added from modules.dep, in load order).
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)

#: Host binaries copied into the image with their shared libraries (ldd).
DEFAULT_BINARIES: tuple[str, ...] = ("iperf3",)

BUSYBOX_CANDIDATES: tuple[str, ...] = ("/bin/busybox", "/usr/bin/busybox")

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pyvirtio"

#: Bumped when `_write_image` lays the image out differently (part of the cache key).
IMAGE_LAYOUT = 2

INIT_SCRIPT = r"""#!/bin/sh
# pyvirtio test guest init: mount, load virtio modules, configure eth0, then
# serve shell commands on ttyS0 (protocol in pyvirtio/guest/initramfs.py).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
dmesg -n 1
while read -r mod; do
    insmod "/lib/modules/$mod" || echo "@@PYVIRTIO-WARN insmod $mod failed@@"
done < /etc/pyvirtio/modules
ip link set lo up
addr=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyvirtio.ip=*) addr="${arg#pyvirtio.ip=}" ;;
    esac
done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    if [ -n "$addr" ]; then ip addr add "$addr" dev eth0; fi
    # Report "ready" only once the link is usable (carrier and operstate up; ~1 s after probe).
    n=0
    while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $n -lt 500 ]; do
        usleep 10000; n=$((n + 1))
    done
    [ $n -lt 500 ] || echo "@@PYVIRTIO-WARN eth0 has no carrier@@"
fi
exec < /dev/ttyS0 > /dev/ttyS0 2>&1
stty -echo -onlcr
echo "@@PYVIRTIO-READY@@"
while read -r id cmd; do
    [ -n "$id" ] || continue
    echo "@@PYVIRTIO-BEGIN $id@@"
    ( eval "$cmd" ) < /dev/null
    echo "@@PYVIRTIO-DONE $id $?@@"
done
poweroff -f
"""


class InitramfsError(RuntimeError):
    """A host file the initramfs needs is missing or unusable (the host's fault, not the guest's)."""


@dataclasses.dataclass(slots=True, frozen=True)
class KernelInfo:
    """A bootable guest kernel and the modules built for it."""

    image: Path
    version: str
    modules_dir: Path


def find_kernel(version: str | None = None) -> KernelInfo:
    """Find a guest kernel in /boot with a matching /lib/modules directory.

    `version` selects one (e.g. "6.1.0-56-amd64"); by default the newest
    `vmlinuz-*` that has a modules directory with a modules.dep wins. The
    host's running kernel is irrelevant: the guest kernel only has to exist
    on disk. Raises `InitramfsError` when none is found.
    """
    candidates: list[KernelInfo] = []
    for image in Path("/boot").glob("vmlinuz-*"):
        ver = image.name.removeprefix("vmlinuz-")
        mods = Path("/lib/modules") / ver
        if (mods / "modules.dep").is_file() and (version is None or ver == version):
            candidates.append(KernelInfo(image, ver, mods))
    if not candidates:
        want = f"version {version}" if version else "any version"
        raise InitramfsError(
            f"no /boot/vmlinuz-* with /lib/modules/<ver>/modules.dep ({want}); install linux-image-amd64"
        )
    candidates.sort(key=lambda k: _version_key(k.version))
    return candidates[-1]


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-]", version))


def kernel_supports_pvh(kernel: KernelInfo) -> bool:
    """Whether the kernel was built with CONFIG_PVH=y (per /boot/config-<version>), i.e. its
    uncompressed vmlinux can be booted directly by QEMU's PVH loader."""
    config = kernel.image.parent / f"config-{kernel.version}"
    try:
        return "\nCONFIG_PVH=y\n" in config.read_text()
    except OSError:
        return False


def _bzimage_payload(image: bytes) -> bytes:
    """Return the compressed kernel inside a bzImage (boot protocol >= 2.08 header fields)."""
    if (
        len(image) < 0x250
        or image[0x202:0x206] != b"HdrS"
        or struct.unpack_from("<H", image, 0x206)[0] < 0x208
    ):
        raise InitramfsError("not a bzImage with boot protocol >= 2.08")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return image[start : start + length]


def extract_vmlinux(kernel: KernelInfo, cache_dir: Path | None = None) -> Path:
    """Return the uncompressed ELF vmlinux of `kernel`'s bzImage, extracting it once into the cache.

    Booting it through QEMU's PVH entry skips the in-guest decompressor,
    which under TCG takes seconds (Debian's kernel is xz-compressed): the
    guest boots in about 3 s instead of 6. Supports xz, lzma, gzip and
    bzip2 payloads; raises `InitramfsError` for others (zstd, lz4, lzo) or
    if the result is not an ELF file.
    """
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    st = kernel.image.stat()
    key = hashlib.sha256(f"{kernel.image}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / f"vmlinux-{kernel.version}-{key}"
    if target.is_file():
        return target
    payload = _bzimage_payload(kernel.image.read_bytes())
    if payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x5d\x00\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        data = zlib.decompressobj(wbits=31).decompress(payload)
    elif payload.startswith(b"BZh"):
        data = bz2.BZ2Decompressor().decompress(payload)
    else:
        raise InitramfsError(f"{kernel.image}: unsupported kernel compression (magic {payload[:4].hex()})")
    if not data.startswith(b"\x7fELF"):
        raise InitramfsError(f"{kernel.image}: decompressed payload is not an ELF vmlinux")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vmlinux-", suffix=".tmp", dir=cache)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("extracted %s (%d MiB)", target, len(data) >> 20)
    return target


# --- cpio "newc" writer -------------------------------------------------------------------------


class CpioWriter:
    """Writes a cpio "newc" (SVR4 without CRC) archive, as the kernel's initramfs unpacker reads it.

    Entries are written in call order; parent directories must be added before
    their children. Timestamps, owners and inode numbers are fixed so that the
    same inputs produce the same bytes.
    """

    _MAGIC = b"070701"

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        # fmt: off
        fields = (
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),  # ino mode uid gid nlink mtime size
            0, 0, rdev[0], rdev[1], len(encoded), 0,  # devmajor devminor rdevmajor rdevminor namesize check
        )
        # fmt: on
        self._ino += 1
        header = self._MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    def has(self, name: str) -> bool:
        """Whether an entry of that name was already written."""
        return name.lstrip("/") in self._names

    def directory(self, name: str, perm: int = 0o755) -> None:
        """Add a directory."""
        self._entry(name, stat.S_IFDIR | perm)

    def directories(self, name: str) -> None:
        """Add `name` and every missing parent directory of it."""
        parts = Path(name.lstrip("/")).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self.has(sub):
                self.directory(sub)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file with the given contents."""
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link `name` -> `target`."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node (no mknod on the host needed)."""
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer; no entries may follow."""
        self._entry("TRAILER!!!", 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


# --- host file discovery ------------------------------------------------------------------------


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Return the modules.dep paths of `names` and all their dependencies, in a valid load order.

    Names use either '-' or '_' (the kernel treats them alike). Raises
    `InitramfsError` for a module the kernel does not ship as a module.
    """
    deps = read_modules_dep(modules_dir)
    by_name = {_module_name(path): path for path in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise InitramfsError(f"module {name!r} not in {modules_dir}/modules.dep (built in, or missing?)")
        visit(by_name[key])
    return order


def read_modules_dep(modules_dir: Path) -> dict[str, list[str]]:
    """Parse `modules_dir/modules.dep`: module path -> the paths it depends on."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    return deps


def _uncompressed_path(path: str) -> str:
    """A modules.dep path with any compression suffix removed (the image holds plain .ko files)."""
    for suffix in (".xz", ".gz", ".zst"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_module(path: Path) -> bytes:
    """Return a module's ELF bytes, decompressing .ko.xz/.ko.gz (busybox insmod loads plain .ko only)."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        raise InitramfsError(f"{path}: zstd-compressed modules are not supported (Python has no zstd)")
    return raw


def find_busybox() -> Path:
    """Return the host's statically linked busybox (Debian package busybox-static)."""
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise InitramfsError("busybox not found; install busybox-static")


def busybox_applets(busybox: Path) -> list[str]:
    """Return the install paths of busybox's applets ("bin/sh", "sbin/insmod", ...)."""
    out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True).stdout
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def shared_libraries(binary: Path) -> list[Path]:
    """Return the shared libraries (and the ELF interpreter) a dynamic binary needs, by ldd.

    The paths are as the loader names them (e.g. /lib64/ld-linux-x86-64.so.2),
    which is where they must be in the guest.
    """
    proc = subprocess.run(["ldd", str(binary)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise InitramfsError(f"ldd {binary} failed: {proc.stderr.strip()}")
    libs: list[Path] = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(", 1)[0].strip()
            if target == "not found":
                raise InitramfsError(f"{binary}: {line}")
            if target:
                libs.append(Path(target))
        elif line.startswith("/"):
            libs.append(Path(line.split("(", 1)[0].strip()))
    return libs


# --- the build ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Plan:
    kernel: KernelInfo
    busybox: Path
    modules: list[str]
    binaries: list[Path]
    files: dict[str, Path]  # guest path -> host file (binaries and libraries)
    init_script: str

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(f"layout {IMAGE_LAYOUT}\0".encode())
        h.update(self.init_script.encode())
        h.update(self.kernel.version.encode())
        for mod in self.modules:
            h.update(mod.encode() + b"\0")
            h.update(str((self.kernel.modules_dir / mod).stat().st_mtime_ns).encode())
        for guest_path, host in sorted(self.files.items()):
            st = host.stat()
            h.update(f"{guest_path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        bst = self.busybox.stat()
        h.update(f"busybox\0{bst.st_size}\0{bst.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _plan(kernel: KernelInfo, modules: Sequence[str], binaries: Sequence[str], init_script: str) -> _Plan:
    busybox = find_busybox()
    files: dict[str, Path] = {}
    bins: list[Path] = []
    for name in binaries:
        found = shutil.which(name)
        if found is None:
            raise InitramfsError(f"{name} not found on the host (install the Debian package {name})")
        path = Path(found)
        bins.append(path)
        files[f"usr/bin/{path.name}"] = path
        for lib in shared_libraries(path):
            files[str(lib).lstrip("/")] = lib
    return _Plan(kernel, busybox, resolve_modules(kernel.modules_dir, modules), bins, files, init_script)


def _write_image(plan: _Plan, out: io.BufferedIOBase) -> None:
    cpio = CpioWriter(out)
    cpio.directory("tmp", 0o1777)
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "root",
        "etc/pyvirtio",
        "lib/modules",
    ):
        cpio.directories(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", plan.busybox.read_bytes(), 0o755)
    for applet in busybox_applets(plan.busybox):
        if applet == "bin/busybox" or cpio.has(applet):
            continue
        cpio.directories(str(Path(applet).parent))
        cpio.symlink(applet, "/bin/busybox")
    for guest_path, host in sorted(plan.files.items()):
        if cpio.has(guest_path):
            continue
        cpio.directories(str(Path(guest_path).parent))
        # Follow host symlinks (merged /usr, versioned sonames): the guest gets a regular file.
        cpio.file(guest_path, host.read_bytes(), 0o755)
    # Modules live where busybox modprobe looks for them (/lib/modules/<version>/<path>, with a
    # modules.dep for the subset), so `rmmod virtio_net; modprobe virtio_net` works in the guest;
    # /lib/modules/<name>.ko links to each for /init's insmod loop.
    names: list[str] = []
    version_dir = f"lib/modules/{plan.kernel.version}"
    all_deps = read_modules_dep(plan.kernel.modules_dir)
    dep_lines: list[str] = []
    for mod in plan.modules:
        data = read_module(plan.kernel.modules_dir / mod)
        rel = _uncompressed_path(mod)
        cpio.directories(str(Path(version_dir, rel).parent))
        cpio.file(f"{version_dir}/{rel}", data)
        name = _module_name(mod) + ".ko"
        cpio.symlink(f"lib/modules/{name}", f"/{version_dir}/{rel}")
        names.append(name)
        dep_lines.append(f"{rel}: {' '.join(_uncompressed_path(d) for d in all_deps.get(mod, []))}".rstrip())
    cpio.file(f"{version_dir}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    cpio.file("etc/pyvirtio/modules", ("\n".join(names) + "\n").encode())
    cpio.file("init", plan.init_script.encode(), 0o755)
    cpio.finish()


def build_initramfs(
    cache_dir: Path | None = None,
    *,
    kernel: KernelInfo | None = None,
    modules: Sequence[str] = DEFAULT_MODULES,
    binaries: Sequence[str] = DEFAULT_BINARIES,
    init_script: str = INIT_SCRIPT,
) -> Path:
    """Return the path of a gzip'd cpio initramfs for `kernel`, building it if it is not cached.

    The file is named `initramfs-<kernel version>-<digest>.cpio.gz` in
    `cache_dir` (default `~/.cache/pyvirtio/`); the digest covers the init
    script, the module list and the identity (size, mtime) of every host file
    copied in. It is written to a temporary file and renamed into place, so
    concurrent builders never see a partial image. Raises `InitramfsError`
    when busybox, a binary, a library or a module is missing on the host.
    """
    kernel = kernel or find_kernel()
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    plan = _plan(kernel, modules, binaries, init_script)
    target = cache / f"initramfs-{kernel.version}-{plan.digest()}.cpio.gz"
    if target.is_file():
        log.debug("initramfs cached: %s", target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", suffix=".tmp", dir=cache)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        ):
            _write_image(plan, gz)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info(
        "built initramfs %s (%d modules, %d KiB)", target, len(plan.modules), target.stat().st_size // 1024
    )
    return target
