"""The stand-in: the small host process that conmon watches in place of a process in a VM.

conmon treats the runtime's pid-file pid as the container: it reads that process's stdout and
stderr (or terminal), writes its stdin and records its exit code. The stand-in hands exactly
those fds to the pod's VM supervisor, which relays them to the guest agent
(``crivm.shim.standin_relay``), then only waits: for signals, which it passes on, and for the
guest process's exit code, which it exits with. So one idle container costs the host a bare
interpreter, not an asyncio + protobuf process of its own.

``crivm-shim create`` and ``exec`` fork and exec it as a fresh interpreter (a fork alone would
keep the CLI's heap)::

    python3 -I -S .../crivm/shim/standin.py SOCKET CONTAINER_ID EXEC_ID FLAGS OOM_FILE

It is run as a script, not as ``-m crivm.shim.standin``, so that it imports nothing from the
crivm package and works without site-packages (``-S``); it uses the C modules ``_socket`` and
``_signal`` directly because ``socket`` and ``signal`` pull in ``enum`` (about 1 MiB of PSS).

The wire format, shared with the supervisor side: one SOCK_SEQPACKET connection per stand-in,
each message NUL-separated fields, the first naming the message:

- ``handoff`` container_id exec_id flags oom_file, with fds 0, 1, 2 attached (SCM_RIGHTS);
- ``signal`` number: a signal the stand-in got, for the guest process (SIGWINCH: a resize);
- ``exit`` code (supervisor to stand-in): the guest process's exit code, 128 + n for a
  signal death as the agent reports it; the stand-in exits with it.

If the supervisor goes away first (the VM stopped), the stand-in exits with LOST_EXIT_CODE.
"""

from __future__ import annotations

import _socket
import os
import sys

# typing.TYPE_CHECKING would import typing; mypy knows the name either way. _signal has no
# stubs, but it is what signal wraps.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

# Exit code when the VM went away under the process: like a SIGKILL.
LOST_EXIT_CODE = 137
FORWARDED_SIGNALS: tuple[int, ...] = (
    _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
    _signal.SIGUSR2, _signal.SIGCONT)
SIGWINCH: int = _signal.SIGWINCH

HANDOFF = "handoff"
SIGNAL = "signal"
EXIT = "exit"
FLAG_TERMINAL = "terminal"
FLAG_STDIN = "stdin"
# The stand-in's stdio, handed over in this order.
HANDED_FDS = (0, 1, 2)
MAX_MESSAGE = 8192
# What the kernel shows as the process's name (ps, /proc/PID/comm; at most 15 bytes).
PROCESS_NAME = "crivm-standin"


def encode(kind: str, *fields: str) -> bytes:
    return b"\0".join(os.fsencode(part) for part in (kind, *fields))


def decode(message: bytes) -> tuple[str, list[str]]:
    kind, *fields = (os.fsdecode(part) for part in message.split(b"\0"))
    return kind, fields


def flags_of(terminal: bool, stdin: bool) -> str:
    return ",".join(name for name, on in ((FLAG_TERMINAL, terminal), (FLAG_STDIN, stdin)) if on)


def argv(python: str, socket_path: str, container_id: str, exec_id: str, terminal: bool,
         stdin: bool, oom_file: str) -> list[str]:
    """The command line that runs the stand-in (for ``os.execv``)."""
    return [python, "-I", "-S", os.path.abspath(__file__), socket_path, container_id, exec_id,
            flags_of(terminal, stdin), oom_file]


def _say(text: str) -> None:
    try:
        os.write(2, f"crivm-shim: {text}\n".encode(errors="replace"))
    except OSError:
        pass  # nowhere left to say it


class _Forwarder:
    """Passes the signals we get to the supervisor; ones that come before the hand-off is
    done wait for it, so an early SIGTERM is not lost (nor kills us by default)."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.pending: list[int] | None = []

    def on_signal(self, signum: int, frame: object) -> None:
        if self.pending is not None:
            self.pending.append(signum)
            return
        self._send(signum)

    def handed_off(self) -> None:
        pending, self.pending = self.pending or [], None
        for signum in pending:
            self._send(signum)

    def _send(self, signum: int) -> None:
        try:
            self.sock.send(encode(SIGNAL, str(signum)))
        except OSError:
            pass  # the supervisor is gone; the receive loop notices


def run(socket_path: str, container_id: str, exec_id: str, flags: str, oom_file: str) -> int:
    """Hand our stdio over, then wait for the exit code; returns it."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    forwarder = _Forwarder(sock)
    signals = FORWARDED_SIGNALS
    if FLAG_TERMINAL in flags.split(","):
        signals = (*signals, SIGWINCH)
    for signum in signals:
        _signal.signal(signum, forwarder.on_signal)
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in HANDED_FDS)
    try:
        sock.connect(socket_path)
        sock.sendmsg([encode(HANDOFF, container_id, exec_id, flags, oom_file)],
                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    except OSError as exc:
        _say(f"cannot hand the process over to the pod's supervisor at {socket_path}: {exc}")
        return LOST_EXIT_CODE
    # Our copies of the stdio stay open: conmon sees the pipes closed only when the
    # supervisor has relayed the last output and we exit.
    forwarder.handed_off()
    while True:
        try:
            message = sock.recv(MAX_MESSAGE)
        except OSError as exc:
            _say(f"lost the pod's supervisor: {exc}")
            return LOST_EXIT_CODE
        if not message:
            _say("lost the process in the VM: the pod's supervisor went away")
            return LOST_EXIT_CODE
        kind, fields = decode(message)
        if kind == EXIT and fields and fields[0].lstrip("-").isdigit():
            return int(fields[0])


def _name_process() -> None:
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(PROCESS_NAME)
    except OSError:
        pass  # only cosmetic


def main(args: list[str]) -> int:
    if len(args) != 5:
        _say("usage: standin.py SOCKET CONTAINER_ID EXEC_ID FLAGS OOM_FILE")
        return 2
    _name_process()
    return run(*args)


if __name__ == "__main__":
    # os._exit: exit at once with the code, as the process we stand in for did.
    os._exit(main(sys.argv[1:]) & 0xFF)
