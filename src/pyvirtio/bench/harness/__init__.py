"""Real-guest harness: boot a Linux 6.1 guest under QEMU 7.2 (TCG) and run commands in it.

Three parts, usable together or alone:

* `build_initramfs` (initramfs.py): a cached busybox + iperf3 + virtio
  modules initramfs whose /init serves shell commands on the serial console;
* `Guest` (qemu.py): the QEMU process (shared memfd RAM, devices given as
  QEMU arguments by the caller) and `run(cmd) -> (status, output)`; the
  `*_args` helpers build the devices: QEMU's built-in virtio-net/virtio-blk/virtio-rng,
  or the same device types served by a vhost-user backend;
* `NetNamespace` (netns.py): a private namespace with the TAP the guest's NIC
  attaches to, and the place to run host-side peers such as `iperf3 -s`;
* `PyvirtioNetBackend` (backend.py): our vhost-user-net back-end as a child
  process inside that namespace, serving its TAP, with its counters on demand;
* `destination`, `migrate` (migration.py): a second QEMU for the same guest
  (`-incoming defer`) and a live migration into it over QMP;
* `IperfServer`, `run_iperf` (iperf.py): iperf3 between guest and namespace;
* `GuestNetwork` (network.py): all of the above for one `NetVariant`
  (back-end lazy/eager/builtin, ring, EVENT_IDX, ...), as tests and
  `pyvirtio bench guest` use it.

Everything here needs root, QEMU, a guest kernel in /boot, busybox-static
and iperf3 (`scripts/setup.sh --peers`).
"""

from pyvirtio.bench.harness.backend import (
    BackendError,
    PyvirtioNetBackend,
    queue_counters,
    queue_deltas,
    ring_errors,
)
from pyvirtio.bench.harness.initramfs import (
    DEFAULT_CACHE_DIR,
    DEFAULT_MODULES,
    InitramfsError,
    KernelInfo,
    build_initramfs,
    extract_vmlinux,
    find_kernel,
)
from pyvirtio.bench.harness.iperf import (
    TESTS,
    IperfError,
    IperfResult,
    IperfServer,
    parse_iperf_json,
    run_iperf,
)
from pyvirtio.bench.harness.migration import MigrationError, MigrationResult, destination, migrate
from pyvirtio.bench.harness.netns import (
    NetNamespace,
    NetNamespaceError,
    netns_exists,
    remove_stale_namespaces,
    wrap_command,
)
from pyvirtio.bench.harness.network import BACKENDS, RINGS, GuestNetwork, NetVariant, feature_bit
from pyvirtio.bench.harness.qemu import (
    Guest,
    GuestError,
    GuestExited,
    GuestTimeout,
    builtin_9p_args,
    builtin_blk_args,
    builtin_net_args,
    builtin_rng_args,
    qemu_escape,
    vhost_user_blk_args,
    vhost_user_fs_args,
    vhost_user_net_args,
    vhost_user_rng_args,
    vhost_user_vsock_args,
    virtio_net_device_args,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_MODULES",
    "RINGS",
    "TESTS",
    "BackendError",
    "Guest",
    "GuestError",
    "GuestExited",
    "GuestNetwork",
    "GuestTimeout",
    "InitramfsError",
    "IperfError",
    "IperfResult",
    "IperfServer",
    "KernelInfo",
    "MigrationError",
    "MigrationResult",
    "NetNamespace",
    "NetNamespaceError",
    "NetVariant",
    "PyvirtioNetBackend",
    "build_initramfs",
    "builtin_9p_args",
    "builtin_blk_args",
    "builtin_net_args",
    "builtin_rng_args",
    "destination",
    "extract_vmlinux",
    "feature_bit",
    "find_kernel",
    "migrate",
    "netns_exists",
    "parse_iperf_json",
    "qemu_escape",
    "queue_counters",
    "queue_deltas",
    "remove_stale_namespaces",
    "ring_errors",
    "run_iperf",
    "vhost_user_blk_args",
    "vhost_user_fs_args",
    "vhost_user_net_args",
    "vhost_user_rng_args",
    "vhost_user_vsock_args",
    "virtio_net_device_args",
    "wrap_command",
]
