"""Credentials from CRI fields and auth files, and WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from crivm.errors import ConfigError
from crivm.storage.credentials import AuthFile, Credentials, parse_challenge


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_from_auth_fields() -> None:
    assert Credentials.from_auth_fields(auth=_b64("u:p:x")) == Credentials("u", "p:x")
    assert Credentials.from_auth_fields(username="a", password="b") == Credentials("a", "b")
    assert not Credentials.from_auth_fields()
    assert Credentials.from_auth_fields(registry_token="t")
    with pytest.raises(ValueError):
        Credentials.from_auth_fields(auth="not base64!")


def test_auth_file_lookup(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {
        "registry.local:5000": {"auth": _b64("host:pw")},
        "registry.local:5000/team": {"auth": _b64("team:pw")},
        "https://index.docker.io/v1/": {"auth": _b64("hub:pw")},
        "token.local": {"identitytoken": "refresh"},
    }}))
    auth = AuthFile.load(str(path))
    assert auth.lookup("registry.local:5000", "team/app").username == "team"
    assert auth.lookup("registry.local:5000", "other/app").username == "host"
    assert auth.lookup("docker.io", "library/busybox").username == "hub"
    assert auth.lookup("token.local", "x").identity_token == "refresh"
    assert not auth.lookup("elsewhere.local", "x")
    assert not AuthFile.load(str(tmp_path / "absent.json")).lookup("registry.local:5000", "x")


def test_bad_auth_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        AuthFile.load(str(path))


def test_parse_challenge() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push",
    }
    basic = parse_challenge('Basic realm="crivm-test"')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == "crivm-test"
    assert parse_challenge("") is None
