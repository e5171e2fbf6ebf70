"""registries.conf v2: prefix matching, location rewriting, mirror order, blocking."""

from __future__ import annotations

from pathlib import Path

import pytest

from crivm.errors import ConfigError, PermissionDenied
from crivm.storage.reference import parse
from crivm.storage.registries_conf import from_dict, load

CONF = """
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "registry.local:5000/hub"
[[registry.mirror]]
location = "mirror-a.local"
[[registry.mirror]]
location = "mirror-b.local:8080/cache"
insecure = true

[[registry]]
prefix = "docker.io/library/busybox"
location = "special.local/bb"

[[registry]]
location = "plain.local:5000"
insecure = true

[[registry]]
prefix = "*.corp.example"
[[registry.mirror]]
location = "corp-mirror.local"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "blocked.example"
blocked = true

[registries.insecure]
registries = ["legacy.local"]
"""


@pytest.fixture
def conf(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "registries.conf"
    path.write_text(CONF)
    return load(path)


def _where(conf, text: str) -> list[tuple[str, bool, bool]]:  # type: ignore[no-untyped-def]
    return [(str(s.reference), s.insecure, s.is_mirror) for s in conf.sources(parse(text))]


def test_mirrors_in_order_then_rewritten_location(conf) -> None:  # type: ignore[no-untyped-def]
    assert _where(conf, "nginx:1") == [
        ("mirror-a.local/library/nginx:1", False, True),
        ("mirror-b.local:8080/cache/library/nginx:1", True, True),
        ("registry.local:5000/hub/library/nginx:1", False, False),
    ]


def test_longest_prefix_wins(conf) -> None:  # type: ignore[no-untyped-def]
    assert _where(conf, "busybox") == [("special.local/bb:latest", False, False)]
    # "docker.io/library/busyboxes" must not match the busybox prefix.
    assert _where(conf, "busyboxes")[-1][0] == "registry.local:5000/hub/library/busyboxes:latest"


def test_location_only_entry_and_v1_insecure(conf) -> None:  # type: ignore[no-untyped-def]
    assert _where(conf, "plain.local:5000/x") == [("plain.local:5000/x:latest", True, False)]
    assert _where(conf, "legacy.local/x") == [("legacy.local/x:latest", True, False)]
    assert _where(conf, "quay.io/x") == [("quay.io/x:latest", False, False)]


def test_wildcard_and_digest_only_mirror(conf) -> None:  # type: ignore[no-untyped-def]
    assert _where(conf, "a.corp.example/app:1") == [("a.corp.example/app:1", False, False)]
    digest = "sha256:" + "0" * 64
    assert _where(conf, f"a.corp.example/app@{digest}") == [
        (f"corp-mirror.local/app@{digest}", False, True),
        (f"a.corp.example/app@{digest}", False, False),
    ]


def test_blocked(conf) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionDenied):
        conf.sources(parse("blocked.example/x"))


def test_missing_file_means_no_config(tmp_path: Path) -> None:
    conf = load(tmp_path / "absent.conf")
    assert _where(conf, "busybox") == [("docker.io/library/busybox:latest", False, False)]


@pytest.mark.parametrize(
    "raw",
    [
        {"bogus": 1},
        {"registry": [{"prefix": "x.io", "locaton": "typo"}]},
        {"registry": [{"prefix": "x.io", "insecure": "yes"}]},
        {"registry": [{}]},
        {"registry": [{"prefix": "x.io", "mirror": [{"insecure": True}]}]},
        {"registry": [{"prefix": "*.x.io", "location": "y.io"}]},
    ],
)
def test_bad_config_names_the_key(raw: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError):
        from_dict(raw, "registries.conf")
