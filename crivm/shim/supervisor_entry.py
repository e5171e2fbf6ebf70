"""How the daemon starts a VM pod's supervisor:
``python3 -m crivm.shim.supervisor_entry <vm.json>``.

asyncio imports ``ssl`` whenever it can, and loading OpenSSL cost every VM pod's supervisor
~4.5 MiB PSS (26.6 → 22.1 MiB for its imports alone), while it only ever talks over unix
sockets and pipes. Marking the module absent before anything imports asyncio makes asyncio
run as on a Python built without ssl. This lives in its own module because
``vm_supervisor`` imports asyncio at its top.
"""

import sys

sys.modules["ssl"] = None  # type: ignore[assignment]

from crivm.shim import vm_supervisor  # noqa: E402 - after the ssl block, on purpose

if __name__ == "__main__":
    sys.exit(vm_supervisor.main())
