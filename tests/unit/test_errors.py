import subprocess
import sys

import grpc

from crivm import errors


def all_error_classes() -> list[type[errors.CrivmError]]:
    found, todo = [], [errors.CrivmError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_names_a_grpc_status_code() -> None:
    classes = all_error_classes()
    assert len(classes) > 10
    for cls in classes:
        assert grpc.StatusCode[cls.code] is not grpc.StatusCode.OK, cls


def test_the_shim_does_not_load_grpc_or_the_daemon_side() -> None:
    # One crivm-shim runs per VM container: what it imports is host memory per container.
    probe = ("import sys, crivm.shim.main; "
             "print(sorted(m for m in ('grpc', 'pyroute2', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]"
