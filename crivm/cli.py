"""The ``crivm`` command: serve, config, doctor, guest-image."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from crivm.errors import CrivmError
from crivm.runtime import config as configmod


def _load_config(path: str | None) -> configmod.Config:
    """An explicit --config must exist; without one, the default path is used if present."""
    if path:
        return configmod.load(path)
    if os.path.exists(configmod.DEFAULT_CONFIG_PATH):
        return configmod.load(configmod.DEFAULT_CONFIG_PATH)
    return configmod.defaults()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crivm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the CRI daemon in the foreground"),
        ("config", "print the effective configuration as TOML"),
        ("doctor", "probe the host and report what works"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", metavar="PATH",
                         help=f"config file (default {configmod.DEFAULT_CONFIG_PATH} if present)")
    guest = sub.add_parser("guest-image", help="build the VM guest kernel + initramfs")
    guest.add_argument("action", choices=["build"])
    guest.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "guest-image":
            from crivm.guestimage import cli as guest_cli

            return guest_cli.main(args.rest)
        cfg = _load_config(args.config)
        if args.command == "config":
            sys.stdout.write(configmod.to_toml(cfg))
            return 0
        if args.command == "doctor":
            from crivm.runtime import doctor

            return doctor.main(cfg)
        from crivm.runtime import log, server

        log.setup(cfg.log_level, cfg.log_format)
        asyncio.run(server.serve(cfg))
        return 0
    except CrivmError as exc:
        print(f"crivm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
