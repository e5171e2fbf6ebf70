"""Arguments of ``crivm guest-image build``; ``crivm.cli`` hands the rest of argv here."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import get_args

from crivm.guestimage import build as buildmod


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crivm guest-image build",
        description="build the VM guest kernel, initramfs and /usr image")
    parser.add_argument("--out", type=Path, default=buildmod.DEFAULT_OUT_DIR,
                        help=f"output directory (default {buildmod.DEFAULT_OUT_DIR})")
    parser.add_argument("--cache", type=Path, default=buildmod.DEFAULT_CACHE_DIR,
                        help=f"download cache (default {buildmod.DEFAULT_CACHE_DIR})")
    parser.add_argument("--compression", choices=list(get_args(buildmod.Compression)),
                        default=buildmod.DEFAULT_COMPRESSION,
                        help=f"initramfs compression (default {buildmod.DEFAULT_COMPRESSION}: "
                        "the fastest to unpack under TCG; lz4 is 45%% of its size)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    result = asyncio.run(buildmod.build(args.out, args.cache, args.compression, args.force,
                                        progress))
    print(f"kernel  {result.kernel} ({result.kernel_version})")
    print(f"initrd  {result.initrd} ({result.initrd_bytes / 2**20:.1f} MiB)")
    for path in (result.boot_initrd, result.usr_image):
        print(f"{'':8}{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"agent   {'included' if result.has_agent else 'absent (init idles)'}")
    print(f"{'reused' if result.cached else 'built'} in {result.seconds:.1f} s")
    return 0
