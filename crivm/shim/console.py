"""The host side of a VM container's terminal.

With a terminal, conmon passes ``--console-socket`` and expects the runtime to send it the
master of the container's pty (one fd, SCM_RIGHTS), as runc does. The shim makes a host pty,
sends the master to conmon and uses the slave as its stdio; the guest has a pty of its own, so
the host slave is put in raw mode and only carries bytes. The slave is the shim's controlling
terminal, so the shim gets SIGWINCH when conmon resizes the master.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
import tty
from dataclasses import dataclass


@dataclass(frozen=True)
class HostTerminal:
    master: int
    slave: int
    slave_name: str


def open_terminal() -> HostTerminal:
    master, slave = os.openpty()
    tty.setraw(slave)
    return HostTerminal(master, slave, os.ttyname(slave))


def send_master(console_socket: str, terminal: HostTerminal) -> None:
    """Hand the pty master to conmon over its console socket, then close our copy."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(console_socket)
        fds = array.array("i", [terminal.master])
        sock.sendmsg([terminal.slave_name.encode()],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    os.close(terminal.master)


def take_as_controlling_terminal(slave: int) -> None:
    """In a new session, make ``slave`` the controlling terminal and stdin/out/err."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)


def window_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on ``fd``; (0, 0) when it has none."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return 0, 0
    rows, columns, _, _ = struct.unpack("HHHH", packed)
    return rows, columns
