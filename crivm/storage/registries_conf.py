"""containers-registries.conf(5): which locations to pull a reference from, and how.

Version 2 tables are supported: ``[[registry]]`` with ``prefix``, ``location``, ``insecure``,
``blocked``, ``mirror-by-digest-only`` and ``[[registry.mirror]]`` entries with ``location``,
``insecure`` and ``pull-from-mirror``. The version 1 ``[registries.insecure]`` and
``[registries.block]`` lists are read too. Mirrors are tried in the order written, then the
primary location. Short names are not searched: kubelet always means docker.io, so
``unqualified-search-registries`` and ``short-name-mode`` are ignored.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crivm.errors import ConfigError, InvalidArgument, PermissionDenied
from crivm.storage.reference import ImageReference, parse

log = logging.getLogger(__name__)

_KNOWN_TOP = {
    "registry", "registries", "unqualified-search-registries", "short-name-mode",
    "credential-helpers", "aliases",
}


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"  # "all" | "digest-only" | "tag-only"


@dataclass(frozen=True)
class Registry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class PullSource:
    """One place to try: the reference as that endpoint names it, and how to talk to it."""

    reference: ImageReference
    insecure: bool
    is_mirror: bool

    @property
    def host(self) -> str:
        return self.reference.domain


@dataclass(frozen=True)
class RegistriesConf:
    registries: tuple[Registry, ...] = ()
    # Hosts marked insecure or blocked by the v1 lists.
    insecure_hosts: frozenset[str] = field(default_factory=frozenset)
    blocked_hosts: frozenset[str] = field(default_factory=frozenset)

    def find(self, ref: ImageReference) -> Registry | None:
        """The ``[[registry]]`` whose prefix matches longest, if any."""
        best: Registry | None = None
        best_len = -1
        for registry in self.registries:
            matched = _match_length(registry.prefix, ref)
            if matched > best_len:
                best, best_len = registry, matched
        return best

    def sources(self, ref: ImageReference) -> list[PullSource]:
        """Where to pull ``ref`` from, in order: usable mirrors, then the primary location."""
        registry = self.find(ref)
        if registry is None:
            if ref.domain in self.blocked_hosts:
                raise PermissionDenied(f"registry {ref.domain} is blocked in registries.conf")
            return [PullSource(ref, ref.domain in self.insecure_hosts, is_mirror=False)]
        if registry.blocked:
            raise PermissionDenied(
                f"pulling {ref} is blocked by registries.conf prefix {registry.prefix!r}"
            )
        matched = _matched_part(registry.prefix, ref)
        by_digest = ref.digest is not None
        sources = []
        for mirror in registry.mirrors:
            mode = "digest-only" if registry.mirror_by_digest_only else mirror.pull_from_mirror
            if (mode == "digest-only" and not by_digest) or (mode == "tag-only" and by_digest):
                continue
            sources.append(
                PullSource(_rewrite(ref, matched, mirror.location), mirror.insecure, True)
            )
        location = registry.location or matched
        sources.append(PullSource(_rewrite(ref, matched, location), registry.insecure, False))
        return sources


def load(path: str | Path) -> RegistriesConf:
    """Read registries.conf; a missing file means no configuration at all."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        log.info("no registries.conf at %s; pulling from each image's own registry", path)
        return RegistriesConf()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from exc
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot be read: {exc.strerror}") from exc
    return from_dict(raw, path)


def from_dict(raw: dict[str, Any], path: str = "(inline)") -> RegistriesConf:
    for key in raw:
        if key not in _KNOWN_TOP:
            raise ConfigError(path, key, "unknown key")
    registries = []
    entries = raw.get("registry", [])
    if not isinstance(entries, list):
        raise ConfigError(path, "registry", "must be an array of tables ([[registry]])")
    for index, entry in enumerate(entries):
        registries.append(_registry(entry, path, f"registry[{index}]"))
    insecure, blocked = _v1_lists(raw.get("registries", {}), path)
    return RegistriesConf(tuple(registries), frozenset(insecure), frozenset(blocked))


def _registry(entry: Any, path: str, key: str) -> Registry:
    if not isinstance(entry, dict):
        raise ConfigError(path, key, "must be a table")
    allowed = {"prefix", "location", "insecure", "blocked", "mirror-by-digest-only", "mirror"}
    for name in entry:
        if name not in allowed:
            raise ConfigError(path, f"{key}.{name}", "unknown key")
    location = _str(entry, "location", path, key)
    prefix = _str(entry, "prefix", path, key) or location
    if not prefix:
        raise ConfigError(path, key, "needs a prefix or a location")
    if prefix.startswith("*.") and location:
        raise ConfigError(path, f"{key}.location", "a wildcard prefix cannot have a location")
    mirrors = []
    raw_mirrors = entry.get("mirror", [])
    if not isinstance(raw_mirrors, list):
        raise ConfigError(path, f"{key}.mirror", "must be an array of tables")
    for index, raw_mirror in enumerate(raw_mirrors):
        mkey = f"{key}.mirror[{index}]"
        if not isinstance(raw_mirror, dict):
            raise ConfigError(path, mkey, "must be a table")
        for name in raw_mirror:
            if name not in {"location", "insecure", "pull-from-mirror"}:
                raise ConfigError(path, f"{mkey}.{name}", "unknown key")
        mirror_location = _str(raw_mirror, "location", path, mkey)
        if not mirror_location:
            raise ConfigError(path, f"{mkey}.location", "is required")
        mode = _str(raw_mirror, "pull-from-mirror", path, mkey) or "all"
        if mode not in ("all", "digest-only", "tag-only"):
            raise ConfigError(path, f"{mkey}.pull-from-mirror", f"{mode!r} is not known")
        mirrors.append(Mirror(mirror_location, _bool(raw_mirror, "insecure", path, mkey), mode))
    return Registry(
        prefix=prefix,
        location=location,
        insecure=_bool(entry, "insecure", path, key),
        blocked=_bool(entry, "blocked", path, key),
        mirror_by_digest_only=_bool(entry, "mirror-by-digest-only", path, key),
        mirrors=tuple(mirrors),
    )


def _v1_lists(raw: Any, path: str) -> tuple[list[str], list[str]]:
    if not isinstance(raw, dict):
        raise ConfigError(path, "registries", "must be a table")
    lists = []
    for name in ("insecure", "block"):
        table = raw.get(name, {})
        hosts = table.get("registries", []) if isinstance(table, dict) else None
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise ConfigError(path, f"registries.{name}.registries", "must be a list of strings")
        lists.append(hosts)
    return lists[0], lists[1]


def _str(table: dict[str, Any], name: str, path: str, key: str) -> str:
    value = table.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(path, f"{key}.{name}", "must be a string")
    return value


def _bool(table: dict[str, Any], name: str, path: str, key: str) -> bool:
    value = table.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(path, f"{key}.{name}", "must be true or false")
    return value


def _match_length(prefix: str, ref: ImageReference) -> int:
    """How many characters of ``prefix`` match ``ref``; -1 when it does not match."""
    if prefix.startswith("*."):
        host = ref.domain.split(":")[0]
        return len(prefix) if host.endswith(prefix[1:]) else -1
    text = str(ref)
    if text == prefix or (text.startswith(prefix) and text[len(prefix)] in "/:@"):
        return len(prefix)
    return -1


def _matched_part(prefix: str, ref: ImageReference) -> str:
    """The part of the reference's name that the prefix stands for (the host, for wildcards)."""
    return ref.domain if prefix.startswith("*.") else prefix


def _rewrite(ref: ImageReference, matched: str, location: str) -> ImageReference:
    rest = str(ref)[len(matched) :]
    try:
        rewritten = parse(location + rest)
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"registries.conf location {location!r} turns {ref} into an invalid reference: {exc}"
        ) from exc
    # parse() adds library/ and latest for docker.io; the tag and digest must stay as given.
    return ImageReference(rewritten.domain, rewritten.path, ref.tag, ref.digest)
