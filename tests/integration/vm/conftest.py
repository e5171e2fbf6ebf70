"""VM pod tests share the VM daemon fixture (tests/fixtures/vm_daemon.py)."""

from tests.fixtures.vm_daemon import vm_daemon, vm_guest_image  # noqa: F401
