"""A guest that writes to its /usr device cannot change the image every pod boots from.

The guest boots ``initrd-boot.img`` with ``usr.img`` on virtio-pmem, as pods do, but with an
``/init`` that, once /usr is mounted, overwrites a block of /dev/pmem0 as root would, reads it
back past its page cache, and powers off. The host image must hash as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from crivm.guestimage import cpio
from crivm.guestimage.init_script import INIT_SCRIPT
from crivm.hypervisor.qemu.cmdline import UsrImage
from tests.fixtures.guest import BOOT_TIMEOUT_S, VmFactory

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.timeout(400)]

DONE = "pmem-write-test: done"
# After init mounted /usr: block 10 of the device before, the write's status, and the block
# read again with O_DIRECT after dropping caches.
_WRITE_TEST = f"""
say "pmem-write-test: before $(dd if=/dev/pmem0 bs=4096 skip=10 count=1 2>/dev/null | md5sum)"
dd if=/dev/urandom of=/dev/pmem0 bs=4096 seek=10 count=1 conv=notrunc,fsync 2>/dev/null
say "pmem-write-test: dd status $?"
echo 3 > /proc/sys/vm/drop_caches
say "pmem-write-test: after $(dd if=/dev/pmem0 bs=4096 skip=10 count=1 iflag=direct \\
    2>/dev/null | md5sum)"
say "pmem-write-test: usr $(grep ' /usr ' /proc/mounts)"
say "{DONE}"
poweroff -f
"""
_AFTER_MOUNT = "\nip link set lo up\n"


def _write_test_initrd(boot_initrd: Path, dest: Path) -> None:
    """``boot_initrd`` with a second archive appended whose /init replaces the first's: the
    kernel unpacks concatenated archives in order."""
    assert INIT_SCRIPT.count(_AFTER_MOUNT) == 1
    init = INIT_SCRIPT.replace(_AFTER_MOUNT, "\n" + _WRITE_TEST + _AFTER_MOUNT)
    extra = io.BytesIO()
    cpio.write_archive(extra, [cpio.Entry("init", stat.S_IFREG | 0o755, data=init.encode())])
    dest.write_bytes(boot_initrd.read_bytes() + extra.getvalue())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_guest_writes_to_its_usr_device_change_nothing_on_the_host(
        vm_factory: VmFactory) -> None:
    image = vm_factory.image
    # A copy, so that a failure here cannot damage the image other tests boot from.
    usr = vm_factory.directory / "usr.img"
    shutil.copyfile(image.usr_image, usr)
    os.chmod(usr, 0o644)
    before = _sha256(usr)
    initrd = vm_factory.directory / "write-test.img"
    _write_test_initrd(image.boot_initrd, initrd)
    config = dataclasses.replace(vm_factory.config("q35", initrd=initrd),
                                 usr=UsrImage(str(usr), usr.stat().st_size))
    vm = await vm_factory.launch(config)
    await vm.wait_for_console(DONE, BOOT_TIMEOUT_S)
    await asyncio.wait_for(vm.process.wait(), 60)
    console = vm.console_log.read_text(errors="replace")
    said = dict(re.findall(r"pmem-write-test: (\w+) (.*)", console))
    assert "dax=always" in said["usr"] and " ro," in said["usr"], said
    # The guest's write "succeeds" (QEMU drops it), and the device still reads the old bytes.
    assert said["before"] == said["after"], said
    assert _sha256(usr) == before
