"""The shim CLI's arguments: runc's verbs and the flags conmon and the daemon pass.

Global flags come before the verb, as with runc: ``--root`` (required), and ``--log``,
``--log-format``, ``--debug`` and ``--systemd-cgroup``, which are accepted for compatibility.
Verb flags that only make sense for a host container (``--no-pivot``, ``--no-new-keyring``,
``--no-subreaper``, ``--preserve-fds``) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import signal

DEFAULT_ROOT = "/run/crivm/vm-shim"


class ArgumentError(Exception):
    """The command line is not one the CLI understands; the message says why."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(message)


def _container_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("container_id")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crivm-shim", description="OCI runtime CLI for crivm VM containers")
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--log", default="")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--systemd-cgroup", action="store_true")
    parser.add_argument("--version", "-v", action="store_true")
    verbs = parser.add_subparsers(dest="verb", parser_class=_Parser)

    create = verbs.add_parser("create")
    create.add_argument("--bundle", "-b", default=".")
    create.add_argument("--pid-file", default="")
    create.add_argument("--console-socket", default="")
    for flag in ("--no-pivot", "--no-new-keyring", "--no-subreaper"):
        create.add_argument(flag, action="store_true")
    create.add_argument("--preserve-fds", type=int, default=0)
    _container_id(create)

    for name in ("start", "state"):
        _container_id(verbs.add_parser(name))

    kill = verbs.add_parser("kill")
    kill.add_argument("--all", "-a", action="store_true")
    _container_id(kill)
    kill.add_argument("signal", nargs="?", default="SIGTERM")

    delete = verbs.add_parser("delete")
    delete.add_argument("--force", "-f", action="store_true")
    _container_id(delete)

    exec_ = verbs.add_parser("exec")
    exec_.add_argument("--process", "-p", default="")
    exec_.add_argument("--pid-file", default="")
    exec_.add_argument("--detach", "-d", action="store_true")
    exec_.add_argument("--tty", "-t", action="store_true")
    exec_.add_argument("--console-socket", default="")
    exec_.add_argument("--cwd", default="")
    exec_.add_argument("--env", "-e", action="append", default=[])
    exec_.add_argument("--user", "-u", default="")
    exec_.add_argument("--preserve-fds", type=int, default=0)
    exec_.add_argument("--no-subreaper", action="store_true")
    _container_id(exec_)
    exec_.add_argument("command", nargs=argparse.REMAINDER)

    update = verbs.add_parser("update")
    update.add_argument("--resources", "-r", default="")
    _container_id(update)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.version:
        return args
    if not args.verb:
        raise ArgumentError("no command given")
    if args.verb == "exec" and not args.process and not args.command:
        raise ArgumentError("exec needs --process or a command")
    if args.verb == "kill":
        args.signal = parse_signal(args.signal)
    return args


def parse_signal(text: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL`` as a signal number."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
        raise ArgumentError(f"signal {text} is out of range")
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ArgumentError(f"unknown signal {text!r}") from None
