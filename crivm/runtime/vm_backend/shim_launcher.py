"""The executable conmon runs as the OCI runtime of VM containers.

conmon wants a program path for ``--runtime``. The daemon writes a tiny launcher for
``crivm.shim.main`` that runs under the daemon's own interpreter and imports the daemon's own
crivm package, so the shim always matches the daemon, installed or run from a checkout.
``helper_path`` is that import path, which the VM supervisor gets too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LAUNCHER_NAME = "crivm-shim"


def helper_path() -> list[str]:
    """The import path of the daemon's helper interpreters (the VM supervisor, this launcher).

    They run with ``-S``: ``site`` imports whatever its .pth files name (an editable
    install's finder, setuptools' distutils hack, CA bundle hooks), which cost ~5 MiB PSS and
    ~40 ms on the hosts measured, in every supervisor and every shim call. The daemon's own
    ``sys.path`` already holds every directory those files add, so the helpers get it as it
    is, crivm's package root first."""
    root = str(Path(__file__).resolve().parents[3])
    return [root, *(p for p in sys.path if p and p != root and os.path.exists(p))]


def launcher_text(python: str, search_path: list[str]) -> str:
    return (
        f"#!{python} -S\n"
        "# Written by the crivm daemon (crivm.runtime.vm_backend.shim_launcher).\n"
        "import sys\n"
        f"sys.path[:0] = {search_path!r}\n"
        "from crivm.shim.main import main\n"
        "sys.exit(main())\n"
    )


def write_launcher(directory: str) -> str:
    """Write (or refresh) the launcher in ``directory`` and return its path."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, LAUNCHER_NAME)
    tmp = path + ".tmp"
    Path(tmp).write_text(launcher_text(sys.executable, helper_path()))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path
