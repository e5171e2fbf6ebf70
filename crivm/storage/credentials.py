"""Registry credentials: from the CRI request, from a docker-style auth file, and the
``WWW-Authenticate`` challenge that says how to use them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from crivm.errors import ConfigError

log = logging.getLogger(__name__)

# Docker Hub's credentials live under these legacy keys in docker's config.json.
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                    "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """What a client may present. Any field may be empty; an all-empty value means anonymous."""

    username: str = ""
    password: str = ""
    # An OAuth2 refresh token, exchanged at the token realm for access tokens.
    identity_token: str = ""
    # A bearer token to send as it is.
    registry_token: str = ""

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token or self.registry_token)

    @classmethod
    def from_auth_fields(
        cls, username: str = "", password: str = "", auth: str = "",
        identity_token: str = "", registry_token: str = "",
    ) -> Credentials:
        """Build from the fields of CRI ``AuthConfig`` (``auth`` is base64 of ``user:pass``)."""
        if auth and not (username or password):
            username, password = decode_basic(auth)
        return cls(username, password, identity_token, registry_token)


def decode_basic(auth: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(auth, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("auth is not base64 of 'username:password'") from exc
    username, sep, password = decoded.partition(":")
    if not sep:
        raise ValueError("auth is not base64 of 'username:password'")
    return username, password


class AuthFile:
    """A docker ``config.json`` / containers ``auth.json``: ``{"auths": {key: entry}}``.

    Keys may be a host (``registry:5000``), a host with a scheme and a ``/v1/`` path (docker's
    legacy form), or a host with a repository namespace (``registry:5000/team``); the most
    specific key that matches wins, as in containers-auth.json(5).
    """

    def __init__(self, entries: dict[str, Credentials]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: str) -> AuthFile:
        if not path:
            return cls({})
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            log.info("auth file %s does not exist; no stored registry credentials", path)
            return cls({})
        except (OSError, ValueError) as exc:
            raise ConfigError(path, "(file)", f"cannot be read as JSON: {exc}") from exc
        auths = raw.get("auths", {}) if isinstance(raw, dict) else None
        if not isinstance(auths, dict):
            raise ConfigError(path, "auths", "must be an object")
        entries = {}
        for key, entry in auths.items():
            if not isinstance(entry, dict):
                raise ConfigError(path, f"auths.{key}", "must be an object")
            try:
                creds = Credentials.from_auth_fields(
                    username=str(entry.get("username", "")),
                    password=str(entry.get("password", "")),
                    auth=str(entry.get("auth", "")),
                    identity_token=str(entry.get("identitytoken", "")),
                    registry_token=str(entry.get("registrytoken", "")),
                )
            except ValueError as exc:
                raise ConfigError(path, f"auths.{key}.auth", str(exc)) from exc
            entries[_normalise_key(key)] = creds
        return cls(entries)

    def lookup(self, host: str, repository: str) -> Credentials:
        """Credentials for ``host/repository``, trying the longest namespace first."""
        candidates = [f"{host}/{repository}"]
        parts = repository.split("/")
        for end in range(len(parts) - 1, 0, -1):
            candidates.append(f"{host}/{'/'.join(parts[:end])}")
        candidates.append(host)
        if host in ("docker.io", "registry-1.docker.io"):
            candidates.extend(_normalise_key(k) for k in _DOCKER_HUB_KEYS)
        for candidate in candidates:
            creds = self._entries.get(candidate)
            if creds:
                return creds
        return Credentials()


def _normalise_key(key: str) -> str:
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    for suffix in ("/v1/", "/v1", "/v2/", "/v2"):
        key = key.removesuffix(suffix)
    return key.rstrip("/")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer" or "basic"
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([a-zA-Z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` value, e.g. ``Bearer realm="...",service="..."``."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        if not match or match.end() == position:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
        position = match.end()
    return Challenge(scheme.lower(), params)
