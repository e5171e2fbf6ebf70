"""The daemon configuration: TOML shaped like crio.conf, parsed into frozen dataclasses.

Every key is typed and checked when the daemon starts. An error names the file, the key and
what is wrong; unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from crivm.errors import ConfigError

_T = TypeVar("_T")

DEFAULT_CONFIG_PATH = "/etc/crivm/crivm.toml"
# Warm VMs per vm handler: each waiting one holds an idle VM's memory (~200 MiB under TCG).
MAX_WARM_VMS = 16

RuntimeType = Literal["oci", "vm"]
WorkloadTrust = Literal["trusted", "untrusted"]
CgroupManager = Literal["cgroupfs", "systemd"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
Accel = Literal["auto", "kvm", "tcg"]
Machine = Literal["q35", "microvm"]
AgentTransport = Literal["auto", "vsock", "virtio-serial"]
GuestUsr = Literal["auto", "pmem", "initramfs"]


@dataclass(frozen=True)
class RuntimeHandler:
    """One ``[runtimes.<name>]`` table. VM-only keys are ignored by the oci backend."""

    runtime_type: RuntimeType = "oci"
    # oci: the low-level runtime binary conmon drives (runc or crun).
    runtime_path: str = "/usr/sbin/runc"
    # vm: guest artefacts, built by `crivm guest-image build` into <root>/guest by default.
    kernel: str = ""
    initrd: str = ""
    # vm: where the guest's /usr (Python, the agent, crun) comes from. "pmem": a read-only image
    # (usr_image) on virtio-pmem that every pod reads in place from the host's page cache, with
    # initrd-boot.img (q35 only). "initramfs": the whole tree in initrd.img, copied into each
    # guest's RAM (~25 MiB more host memory per pod). "auto": pmem on q35, else initramfs.
    guest_usr: GuestUsr = "auto"
    usr_image: str = ""
    qemu_path: str = "/usr/bin/qemu-system-x86_64"
    virtiofsd_path: str = "/usr/lib/qemu/virtiofsd"
    machine: Machine = "q35"
    accel: Accel = "auto"
    agent_transport: AgentTransport = "auto"
    default_vcpus: int = 1
    default_memory_mb: int = 256
    # Memory added to the pod's limits when sizing its VM (guest kernel + agent).
    memory_overhead_mb: int = 128
    boot_timeout_s: float = 120.0
    # TCG translation cache in MiB; 0 leaves QEMU's default (up to 1 GiB, filled as the guest
    # runs new code). 32 boots the guest image as fast as 64 and saves 17-28 MiB of host memory
    # per idle pod; 16 makes TCG flush during boot and is ~60% slower (docs/performance.md).
    tcg_tb_size_mb: int = 32
    # vm: a virtio-balloon device with free page reporting, so the host gets back what the
    # guest frees (its initramfs copy, exited processes): ~35 MiB PSS per idle pod.
    free_page_reporting: bool = True
    # vm: how many VMs to keep booted ahead of their pods (crivm.runtime.vm_backend.warm_pool).
    # A pod of the default size takes one and starts without waiting for a guest boot; each
    # waiting VM costs the host what an idle VM pod does. 0: every pod boots its own.
    warm_vms: int = 0

    @property
    def usr_on_pmem(self) -> bool:
        return self.guest_usr == "pmem" or (self.guest_usr == "auto" and self.machine == "q35")


@dataclass(frozen=True)
class Config:
    """The effective configuration. Defaults suit a root install on a Debian host."""

    listen: str = "/run/crivm/crivm.sock"
    root: str = "/var/lib/crivm"
    runroot: str = "/run/crivm"
    registries_conf: str = "/etc/containers/registries.conf"
    # docker-style auth file (config.json / auth.json); empty means none.
    auth_file: str = ""
    # Directory of per-registry CA bundles: <dir>/<host[:port]>/*.crt, like certs.d.
    registry_certs_dir: str = "/etc/containers/certs.d"
    image_pull_progress_timeout_s: float = 60.0
    pause_image: str = "registry.k8s.io/pause:3.9"
    cni_config_dir: str = "/etc/cni/net.d"
    cni_plugin_dirs: tuple[str, ...] = ("/usr/lib/cni", "/opt/cni/bin")
    conmon_path: str = "/usr/bin/conmon"
    cgroup_manager: CgroupManager = "cgroupfs"
    default_runtime: str = "runc"
    untrusted_runtime: str = "vm"
    default_workload_trust: WorkloadTrust = "trusted"
    runtimes: Mapping[str, RuntimeHandler] = field(
        default_factory=lambda: {
            "runc": RuntimeHandler(runtime_type="oci"),
            "vm": RuntimeHandler(runtime_type="vm"),
        }
    )
    stream_address: str = "127.0.0.1"
    stream_port: int = 0
    stream_token_ttl_s: float = 60.0
    # Prometheus /metrics on 127.0.0.1; 0 disables it.
    metrics_port: int = 0
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"

    @property
    def state_db(self) -> Path:
        return Path(self.root) / "state.db"

    def handler(self, name: str) -> RuntimeHandler:
        return self.runtimes[name]

    def guest_kernel(self, handler: RuntimeHandler) -> Path:
        """The guest kernel a vm handler boots: its own, or `crivm guest-image build`'s."""
        return Path(handler.kernel or Path(self.root) / "guest" / "vmlinuz")

    def guest_initrd(self, handler: RuntimeHandler) -> Path:
        name = "initrd-boot.img" if handler.usr_on_pmem else "initrd.img"
        return Path(handler.initrd or Path(self.root) / "guest" / name)

    def guest_usr_image(self, handler: RuntimeHandler) -> Path | None:
        """The /usr image a vm handler's guests mount from virtio-pmem; None when the initramfs
        carries /usr."""
        if not handler.usr_on_pmem:
            return None
        return Path(handler.usr_image or Path(self.root) / "guest" / "usr.img")

    def guest_files(self, handler: RuntimeHandler) -> list[Path]:
        """Every file a vm handler's guests boot from: kernel, initramfs, and the /usr image
        when it has one."""
        usr = self.guest_usr_image(handler)
        return [self.guest_kernel(handler), self.guest_initrd(handler),
                *([usr] if usr is not None else [])]


def load(path: str | Path) -> Config:
    """Read and validate a config file. A missing file is an error; use ``defaults()`` for none."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(path, "(file)", "does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from exc
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot be read: {exc.strerror}") from exc
    return from_dict(raw, path)


def defaults() -> Config:
    return _validate(Config(), "(defaults)")


def from_dict(raw: Mapping[str, Any], path: str = "(inline)") -> Config:
    raw = dict(raw)
    runtimes_raw = raw.pop("runtimes", None)
    cfg: Config = _build(Config, raw, path, prefix="")
    if runtimes_raw is not None:
        if not isinstance(runtimes_raw, dict) or not runtimes_raw:
            raise ConfigError(path, "runtimes", "must be a non-empty table of [runtimes.<name>]")
        # Like crio.conf: tables add handlers, or adjust the built-in runc and vm ones.
        handlers: dict[str, RuntimeHandler] = dict(cfg.runtimes)
        for name, table in runtimes_raw.items():
            if not isinstance(table, dict):
                raise ConfigError(path, f"runtimes.{name}", "must be a table")
            given = _build(RuntimeHandler, table, path, prefix=f"runtimes.{name}.")
            base = handlers.get(name, RuntimeHandler())
            handlers[name] = dataclasses.replace(
                base, **{key: getattr(given, key) for key in table}
            )
        cfg = dataclasses.replace(cfg, runtimes=handlers)
    return _validate(cfg, path)


def _validate(cfg: Config, path: str) -> Config:
    for key in ("listen", "root", "runroot"):
        if not Path(getattr(cfg, key)).is_absolute():
            raise ConfigError(path, key, "must be an absolute path")
    if cfg.default_runtime not in cfg.runtimes:
        raise ConfigError(
            path, "default_runtime",
            f"names handler {cfg.default_runtime!r}, which has no [runtimes.{cfg.default_runtime}]"
        )
    untrusted_needed = cfg.default_workload_trust == "untrusted" or cfg.untrusted_runtime
    if untrusted_needed and cfg.untrusted_runtime not in cfg.runtimes:
        raise ConfigError(
            path, "untrusted_runtime",
            f"names handler {cfg.untrusted_runtime!r}, which has no "
            f"[runtimes.{cfg.untrusted_runtime}]",
        )
    for port_key in ("stream_port", "metrics_port"):
        port = getattr(cfg, port_key)
        if not 0 <= port <= 65535:
            raise ConfigError(path, port_key, f"{port} is not a TCP port (0-65535)")
    if cfg.image_pull_progress_timeout_s <= 0:
        raise ConfigError(path, "image_pull_progress_timeout_s", "must be positive")
    if cfg.stream_token_ttl_s <= 0:
        raise ConfigError(path, "stream_token_ttl_s", "must be positive")
    for name, handler in cfg.runtimes.items():
        prefix = f"runtimes.{name}"
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(path, prefix, "handler names may hold only letters, digits, -_.")
        if handler.default_vcpus < 1:
            raise ConfigError(path, f"{prefix}.default_vcpus", "must be at least 1")
        if handler.default_memory_mb < 64:
            raise ConfigError(path, f"{prefix}.default_memory_mb", "must be at least 64")
        if handler.memory_overhead_mb < 0 or handler.tcg_tb_size_mb < 0:
            raise ConfigError(path, prefix, "sizes must not be negative")
        if handler.guest_usr == "pmem" and handler.machine != "q35":
            raise ConfigError(path, f"{prefix}.guest_usr",
                              "pmem needs machine = \"q35\" (microvm has no PCI for virtio-pmem)")
        if handler.boot_timeout_s <= 0:
            raise ConfigError(path, f"{prefix}.boot_timeout_s", "must be positive")
        if not 0 <= handler.warm_vms <= MAX_WARM_VMS:
            raise ConfigError(path, f"{prefix}.warm_vms", f"must be 0-{MAX_WARM_VMS}")
    return cfg


def _build(cls: type[_T], raw: Mapping[str, Any], path: str, prefix: str) -> _T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields or key == "runtimes":
            raise ConfigError(path, prefix + key, "unknown key")
        kwargs[key] = _coerce(value, hints[key], path, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str, key: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(path, key, f"{value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(path, key, "must be a list of strings")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(path, key, "unsupported type")  # pragma: no cover - no such keys
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, key, f"must be a number, not {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, key, f"must be an integer, not {type(value).__name__}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"must be true or false, not {type(value).__name__}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, not {type(value).__name__}")
        return value
    raise ConfigError(path, key, "unsupported type")  # pragma: no cover


def to_toml(cfg: Config) -> str:
    """Render the effective config as TOML (for ``crivm config``)."""
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name == "runtimes":
            continue
        lines.append(f"{f.name} = {_toml_value(getattr(cfg, f.name))}")
    for name, handler in cfg.runtimes.items():
        lines.append("")
        lines.append(f"[runtimes.{name}]")
        for f in dataclasses.fields(handler):
            value = getattr(handler, f.name)
            if handler.runtime_type == "oci" and f.name not in ("runtime_type", "runtime_path"):
                continue
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")
