"""Pinned network namespaces, and running code inside them.

A pod's netns is pinned by bind-mounting its nsfs file onto an empty file under our own
directory (default ``/run/crivm/netns``), so it outlives every process in it and does not show
up in ``ip netns`` (which owns ``/run/netns``).

Namespaces belong to OS threads, not processes. Rather than forking a child from a daemon that
runs gRPC threads (fork is unsafe there), every namespace operation runs on a short-lived
dedicated thread: it ``unshare``s or ``setns``es, does its work and exits, so the namespace
change dies with the thread and never leaks into the asyncio loop or a thread pool. A netlink
socket opened on such a thread stays bound to that netns for its whole life.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from crivm.errors import AlreadyExists, CrivmError, InvalidArgument, NotFound, PermissionDenied

log = logging.getLogger(__name__)

DEFAULT_NETNS_DIR = "/run/crivm/netns"
NSENTER = "/usr/bin/nsenter"

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MNT_DETACH = 2
# linux/nsfs.h: _IO(0xb7, 0x3); answers the namespace type of an nsfs file.
_NS_GET_NSTYPE = 0xB703
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_P = ParamSpec("_P")
_T = TypeVar("_T")

_libc: ctypes.CDLL | None = None


@dataclass(frozen=True)
class NetNamespace:
    """A pinned network namespace: ``path`` is what CNI_NETNS, runc and nsenter take."""

    name: str
    path: str


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


def _raise_errno(what: str, path: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _setns(fd: int) -> None:
    if _c().setns(fd, _CLONE_NEWNET) != 0:
        _raise_errno("setns", f"fd {fd}")


def _mount_bind(source: str, target: str) -> None:
    if _c().mount(source.encode(), target.encode(), None, _MS_BIND, None) != 0:
        _raise_errno("bind mount", target)


def _umount_detach(target: str) -> None:
    if _c().umount2(target.encode(), _MNT_DETACH) != 0:
        _raise_errno("umount", target)


def _translate(exc: OSError, what: str, path: str) -> CrivmError:
    if exc.errno == errno.ENOENT:
        return NotFound(f"{what}: network namespace {path} does not exist")
    if exc.errno == errno.EEXIST:
        return AlreadyExists(f"{what}: network namespace {path} already exists")
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{what}: {path}: {exc.strerror} (needs CAP_SYS_ADMIN)")
    if exc.errno == errno.EINVAL:
        return InvalidArgument(f"{what}: {path} is not a network namespace")
    return CrivmError(f"{what}: {path}: {exc.strerror or exc}")


def _run_on_own_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a fresh OS thread and wait; the thread (and its netns) ends with it."""
    box: list[_T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=body, name="crivm-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box[0]


async def _run_on_own_thread_async(fn: Callable[[], _T]) -> _T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="crivm-netns", daemon=True).start()
    return await future


def _entered(
    path: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> Callable[[], _T]:
    def inside() -> _T:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _translate(exc, "enter", path) from exc
        try:
            _setns(fd)
        except OSError as exc:
            raise _translate(exc, "enter", path) from exc
        finally:
            os.close(fd)
        return fn(*args, **kwargs)

    return inside


def run_in_netns(path: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Call ``fn`` on a thread inside the netns pinned at ``path`` and return its result.

    Blocking; for use from threads and tests. ``pyroute2.IPRoute()`` created inside ``fn``
    talks to that netns.
    """
    return _run_on_own_thread(_entered(path, fn, *args, **kwargs))


async def call_in_netns(
    path: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """Like :func:`run_in_netns`, awaited without blocking the event loop."""
    return await _run_on_own_thread_async(_entered(path, fn, *args, **kwargs))


def netns_argv_prefix(path: str) -> list[str]:
    """argv prefix that runs a program inside the netns: ``[*prefix, "qemu-system-x86_64", ...]``.

    nsenter does the setns in the child after fork, which a multi-threaded daemon cannot do
    safely with a ``preexec_fn``.
    """
    return [NSENTER, "--net=" + path, "--"]


def is_netns(path: str) -> bool:
    """True when ``path`` is a pinned (mounted) network namespace file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:  # not an nsfs file: a plain pin file left without its mount
        return False
    finally:
        os.close(fd)


def list_netns(netns_dir: str = DEFAULT_NETNS_DIR) -> list[str]:
    """Names of the pin files in ``netns_dir`` (pinned or not), sorted; for leak checks."""
    try:
        return sorted(os.listdir(netns_dir))
    except FileNotFoundError:
        return []


def _bring_up_loopback() -> None:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=index, state="up")


def _pin_new_netns(pin: str) -> None:
    # Runs on its own thread: unshare moves only this thread, and /proc/thread-self names it.
    if _c().unshare(_CLONE_NEWNET) != 0:
        _raise_errno("unshare", pin)
    _mount_bind("/proc/thread-self/ns/net", pin)
    try:
        _bring_up_loopback()
    except (OSError, NetlinkError, ValueError):
        _umount_detach(pin)
        raise


def _create(name: str, netns_dir: str) -> NetNamespace:
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"netns name {name!r} is not a valid file name")
    pin = str(Path(netns_dir) / name)
    try:
        os.makedirs(netns_dir, mode=0o755, exist_ok=True)
        os.close(os.open(pin, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    except OSError as exc:
        raise _translate(exc, "create netns", pin) from exc
    try:
        _run_on_own_thread(lambda: _pin_new_netns(pin))
    except (OSError, NetlinkError, ValueError) as exc:
        _unlink_quietly(pin)
        if isinstance(exc, OSError):
            raise _translate(exc, "create netns", pin) from exc
        raise CrivmError(f"create netns {pin}: bringing up lo failed: {exc}") from exc
    except BaseException:
        _unlink_quietly(pin)
        raise
    log.debug("created netns %s", pin)
    return NetNamespace(name=name, path=pin)


async def create_netns(name: str, netns_dir: str = DEFAULT_NETNS_DIR) -> NetNamespace:
    """Create a new network namespace pinned at ``<netns_dir>/<name>``, with lo up.

    Raises AlreadyExists when the pin file exists (a crashed create is cleaned by
    :func:`remove_netns`).
    """
    return await asyncio.to_thread(_create, name, netns_dir)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_netns_sync(path: str) -> None:
    """Unpin and delete ``path``; a missing or already unmounted pin is fine (idempotent).

    The namespace itself lives on until its last process exits.
    """
    try:
        _umount_detach(path)
    except OSError as exc:
        # EINVAL: not a mount point (half-made pin); ENOENT: already gone.
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise _translate(exc, "remove netns", path) from exc
    try:
        _unlink_quietly(path)
    except OSError as exc:
        raise _translate(exc, "remove netns", path) from exc
    log.debug("removed netns %s", path)


async def remove_netns(path: str) -> None:
    """Async :func:`remove_netns_sync`."""
    await asyncio.to_thread(remove_netns_sync, path)
