"""Debian packages as guest-image inputs: resolve candidates, download into a cache, extract.

Versions come from the host's apt lists (``apt-cache show``), and every download is checked
against the SHA256 those lists give, so a cache entry is trusted only when its hash matches.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from crivm.guestimage.errors import GuestImageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str
    depends: str

    @property
    def file_name(self) -> str:
        # apt-get download names files name_version_arch.deb with ':' escaped as %3a.
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


async def run_tool(*argv: str, cwd: Path | None = None,
                   env: dict[str, str] | None = None) -> bytes:
    """Run a build tool to completion and return its stdout; a failure names the tool.
    ``env`` adds to the environment."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env={**os.environ, **env} if env else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise GuestImageError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        detail = stderr.decode(errors="replace").strip()[-2000:]
        raise GuestImageError(f"{' '.join(argv[:3])} failed ({proc.returncode}): {detail}")
    return stdout


def _parse_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                stanzas.append(fields)
                fields = {}
            continue
        if line[0].isspace() and key:
            fields[key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return stanzas


async def resolve(names: list[str]) -> list[DebPackage]:
    """The apt candidates of ``names``, in order. One apt-cache run, as each costs seconds."""
    out = await run_tool("apt-cache", "show", "--no-all-versions", *names)
    by_name: dict[str, DebPackage] = {}
    for fields in _parse_stanzas(out.decode()):
        try:
            pkg = DebPackage(fields["Package"], fields["Version"], fields["SHA256"],
                             fields.get("Depends", ""))
        except KeyError as exc:
            raise GuestImageError(f"apt-cache gave a stanza without {exc.args[0]}") from exc
        by_name.setdefault(pkg.name, pkg)
    missing = [name for name in names if name not in by_name]
    if missing:
        raise GuestImageError(f"apt has no candidate for {missing}; run apt-get update")
    return [by_name[name] for name in names]


async def resolve_kernel(meta_name: str) -> DebPackage:
    """Follow a kernel metapackage (linux-image-cloud-amd64) to the versioned image package."""
    [meta] = await resolve([meta_name])
    for alternative in meta.depends.split(","):
        dep = alternative.split("|")[0].split("(")[0].strip()
        if dep.startswith("linux-image-"):
            [image] = await resolve([dep])
            return image
    raise GuestImageError(f"{meta_name} {meta.version} depends on no linux-image package")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def fetch(pkg: DebPackage, cache_dir: Path) -> Path:
    """The package's .deb in ``cache_dir``, downloaded unless a copy with a matching hash is
    already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / pkg.file_name
    if path.exists() and file_sha256(path) == pkg.sha256:
        log.debug("cached %s", path.name)
        return path
    log.info("downloading %s %s", pkg.name, pkg.version)
    # apt drops privileges to _apt for downloads; a root-only cache dir only earns a warning.
    await run_tool("apt-get", "download", "-q", f"{pkg.name}={pkg.version}", cwd=cache_dir)
    if not path.exists():
        raise GuestImageError(f"apt-get download left no {path.name} in {cache_dir}")
    actual = file_sha256(path)
    if actual != pkg.sha256:
        os.unlink(path)
        raise GuestImageError(f"{path.name}: sha256 {actual} does not match apt's {pkg.sha256}")
    return path


async def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    await run_tool("dpkg-deb", "-x", str(deb), str(dest))
