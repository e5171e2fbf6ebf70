"""The executable conmon runs as the OCI runtime of VM containers.

conmon wants a program path for ``--runtime``. The daemon writes a tiny launcher for
``crivm.shim.main`` that runs under the daemon's own interpreter and imports the daemon's own
crivm package, so the shim always matches the daemon, installed or run from a checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LAUNCHER_NAME = "crivm-shim"


def launcher_text(python: str, package_root: str) -> str:
    return (
        f"#!{python}\n"
        "# Written by the crivm daemon (crivm.runtime.vm_backend.shim_launcher).\n"
        "import sys\n"
        f"sys.path.insert(0, {package_root!r})\n"
        "from crivm.shim.main import main\n"
        "sys.exit(main())\n"
    )


def write_launcher(directory: str) -> str:
    """Write (or refresh) the launcher in ``directory`` and return its path."""
    package_root = str(Path(__file__).resolve().parents[3])
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, LAUNCHER_NAME)
    tmp = path + ".tmp"
    Path(tmp).write_text(launcher_text(sys.executable, package_root))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path
