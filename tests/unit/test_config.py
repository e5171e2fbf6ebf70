from pathlib import Path

import pytest

from crivm.errors import ConfigError
from crivm.runtime import config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crivm.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_for_a_root_install() -> None:
    cfg = config.defaults()
    assert cfg.listen == "/run/crivm/crivm.sock"
    assert cfg.runtimes["runc"].runtime_type == "oci"
    assert cfg.runtimes["vm"].runtime_type == "vm"
    assert cfg.state_db == Path("/var/lib/crivm/state.db")


def test_full_file_parses_into_typed_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen = "/tmp/x/crivm.sock"
cni_plugin_dirs = ["/opt/cni/bin"]
stream_port = 10010
image_pull_progress_timeout_s = 5
default_runtime = "crun"
untrusted_runtime = "kata"
default_workload_trust = "untrusted"

[runtimes.crun]
runtime_type = "oci"
runtime_path = "/usr/bin/crun"

[runtimes.kata]
runtime_type = "vm"
machine = "microvm"
default_memory_mb = 512
""",
    )
    cfg = config.load(path)
    assert cfg.cni_plugin_dirs == ("/opt/cni/bin",)
    assert cfg.image_pull_progress_timeout_s == 5.0
    assert set(cfg.runtimes) == {"runc", "vm", "crun", "kata"}
    assert cfg.runtimes["vm"].runtime_type == "vm"
    assert cfg.runtimes["kata"].machine == "microvm"
    assert cfg.runtimes["kata"].default_memory_mb == 512


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('lisen = "/x"', "lisen", "unknown key"),
        ("stream_port = 70000", "stream_port", "not a TCP port"),
        ('stream_port = "80"', "stream_port", "must be an integer"),
        ('default_workload_trust = "maybe"', "default_workload_trust", "is not one of"),
        ('root = "relative/dir"', "root", "absolute path"),
        ('cni_plugin_dirs = "/usr/lib/cni"', "cni_plugin_dirs", "list of strings"),
        ('default_runtime = "nope"', "default_runtime", "no [runtimes.nope]"),
        ('[runtimes.vm]\nruntime_type = "kvm"', "runtimes.vm.runtime_type", "is not one of"),
        ('[runtimes.vm]\nruntime_type = "vm"\nbogus = 1', "runtimes.vm.bogus", "unknown key"),
        ("[runtimes.vm]\ndefault_vcpus = 0", "runtimes.vm.default_vcpus", "at least 1"),
        ("[runtimes.vm]\nwarm_vms = -1", "runtimes.vm.warm_vms", "must be 0-16"),
        ("[runtimes.vm]\nwarm_vms = 17", "runtimes.vm.warm_vms", "must be 0-16"),
        ('[runtimes.vm]\nwarm_vms = "2"', "runtimes.vm.warm_vms", "must be an integer"),
        ("listen = ", "(syntax)", ""),
        ("[runtimes]", "runtimes", "non-empty table"),
    ],
)
def test_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert err.value.path == str(path)
    assert err.value.key == key
    assert problem in err.value.problem
    assert str(path) in str(err.value) and key in str(err.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml")


def test_printed_config_round_trips(tmp_path: Path) -> None:
    cfg = config.from_dict({"stream_port": 1234, "log_format": "json"})
    again = config.load(write(tmp_path, config.to_toml(cfg)))
    assert again == cfg


def test_runtime_tables_adjust_builtin_handlers(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[runtimes.vm]\ndefault_vcpus = 2\n"))
    assert cfg.runtimes["vm"].runtime_type == "vm"
    assert cfg.runtimes["vm"].default_vcpus == 2
    assert cfg.runtimes["vm"].free_page_reporting
    off = config.load(write(tmp_path, "[runtimes.vm]\nfree_page_reporting = false\n"))
    assert not off.runtimes["vm"].free_page_reporting
    assert cfg.runtimes["runc"].runtime_type == "oci"


def test_guest_usr_picks_the_guest_image_files(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, """
[runtimes.kata]
runtime_type = "vm"
machine = "microvm"

[runtimes.plain]
runtime_type = "vm"
guest_usr = "initramfs"

[runtimes.own]
runtime_type = "vm"
initrd = "/img/boot.cpio"
usr_image = "/img/usr.ext4"
"""))
    guest = Path("/var/lib/crivm/guest")
    vm = cfg.runtimes["vm"]
    # q35 (the default machine) reads /usr from virtio-pmem; microvm has no PCI for it.
    assert vm.usr_on_pmem
    assert cfg.guest_initrd(vm) == guest / "initrd-boot.img"
    assert cfg.guest_usr_image(vm) == guest / "usr.img"
    assert cfg.guest_files(vm) == [guest / "vmlinuz", guest / "initrd-boot.img",
                                   guest / "usr.img"]
    for name in ("kata", "plain"):
        handler = cfg.runtimes[name]
        assert not handler.usr_on_pmem
        assert cfg.guest_initrd(handler) == guest / "initrd.img"
        assert cfg.guest_usr_image(handler) is None
        assert cfg.guest_files(handler) == [guest / "vmlinuz", guest / "initrd.img"]
    own = cfg.runtimes["own"]
    assert cfg.guest_initrd(own) == Path("/img/boot.cpio")
    assert cfg.guest_usr_image(own) == Path("/img/usr.ext4")


@pytest.mark.parametrize(("table", "problem"), [
    ('guest_usr = "pmem"\nmachine = "microvm"', "pmem needs machine"),
    ('guest_usr = "disk"', "is not one of"),
])
def test_guest_usr_errors(tmp_path: Path, table: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        config.load(write(tmp_path, f"[runtimes.vm]\n{table}\n"))
    assert "runtimes.vm.guest_usr" in str(err.value)
