"""What a pod's VM supervisor runs, and where a VM pod keeps its files on the host.

The daemon writes a ``VmSpec`` as JSON into the pod directory and starts the supervisor with
its path; the supervisor, the shims and the daemon after a restart all find the pod's sockets
and pid files through ``PodPaths``. Everything here is plain data.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

# Where the guest mounts the pod's shared directory (virtio-fs tag SHARED_TAG).
GUEST_SHARED_DIR = "/run/crivm/shared"
SHARED_TAG = "crivm-shared"


@dataclass(frozen=True)
class PodPaths:
    """The files of one VM pod under ``<runroot>/vm/<pod id>``."""

    pod_dir: str

    def _file(self, name: str) -> str:
        return os.path.join(self.pod_dir, name)

    @property
    def spec(self) -> str:
        return self._file("vm.json")

    @property
    def shared_dir(self) -> str:
        """Served to the guest by virtiofsd; container rootfs and volumes are bound below it."""
        return self._file("shared")

    @property
    def supervisor_pidfile(self) -> str:
        return self._file("supervisor.pid")

    @property
    def supervisor_log(self) -> str:
        return self._file("supervisor.log")

    @property
    def qemu_log(self) -> str:
        return self._file("qemu.log")

    @property
    def console_log(self) -> str:
        return self._file("console.log")

    @property
    def qmp_socket(self) -> str:
        return self._file("qmp.sock")

    @property
    def agent_socket(self) -> str:
        """QEMU's end of the agent's virtio-serial port: only the supervisor connects here."""
        return self._file("agent.sock")

    @property
    def mux_socket(self) -> str:
        """The supervisor's agent socket for everyone else (daemon, shims)."""
        return self._file("agent-mux.sock")

    @property
    def standin_socket(self) -> str:
        """The supervisor's socket for the containers' stand-ins (``crivm.shim.standin``)."""
        return self._file("standin.sock")

    @property
    def virtiofsd_socket(self) -> str:
        return self._file("virtiofsd.sock")

    @property
    def virtiofsd_log(self) -> str:
        return self._file("virtiofsd.log")


@dataclass(frozen=True)
class VmSpec:
    name: str
    pod_dir: str
    qemu_path: str
    virtiofsd_path: str
    kernel: str
    initrd: str
    # The guest's /usr image on virtio-pmem; "" when the initramfs carries /usr.
    usr_image: str = ""
    machine: str = "q35"
    accel: str = "tcg"
    tcg_tb_size_mb: int = 0
    free_page_reporting: bool = True
    vcpus: int = 1
    memory_mb: int = 256
    # The tap in the supervisor's netns that backs the guest NIC; "" for no NIC.
    tap_name: str = ""
    mac: str = ""
    extra_kernel_args: tuple[str, ...] = field(default_factory=tuple)
    startup_timeout_s: float = 30.0
    # CPU niceness of the supervisor, virtiofsd and QEMU, and of their session's autogroup; a
    # warm VM boots at 10, behind the pods that run (crivm.runtime.vm_backend.warm_pool).
    nice: int = 0

    @property
    def paths(self) -> PodPaths:
        return PodPaths(self.pod_dir)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> VmSpec:
        raw = json.loads(text)
        raw["extra_kernel_args"] = tuple(raw.get("extra_kernel_args", ()))
        return cls(**raw)

    @classmethod
    def load(cls, path: str) -> VmSpec:
        with open(path) as spec:
            return cls.from_json(spec.read())
