"""Image references: parsing and the normalisation kubelet expects.

``busybox`` means ``docker.io/library/busybox:latest``; a name with neither tag nor digest gets
``:latest``; ``index.docker.io`` is ``docker.io``. The grammar is the one of the distribution
project's reference package, written out here as regular expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from crivm.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_RE = re.compile(_DOMAIN)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_HEX = {"sha256": 64, "sha512": 128}
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class ImageReference:
    """A fully qualified reference: ``domain/path`` plus a tag, a digest, or both."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository name, e.g. ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest wins over the tag."""
        if self.digest:
            return self.digest
        return self.tag or DEFAULT_TAG

    def tagged(self) -> str | None:
        return f"{self.name}:{self.tag}" if self.tag else None

    def with_digest(self, digest: str) -> str:
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def validate_digest(digest: str) -> str:
    """Check ``algorithm:hex`` for the algorithms we can verify; return it unchanged."""
    if not _DIGEST_RE.fullmatch(digest):
        raise InvalidArgument(f"{digest!r} is not a valid digest")
    algorithm, _, encoded = digest.partition(":")
    expected = _HEX.get(algorithm)
    if expected is None:
        raise InvalidArgument(f"digest {digest!r}: unsupported algorithm {algorithm!r}")
    if len(encoded) != expected or not all(c in "0123456789abcdef" for c in encoded):
        raise InvalidArgument(f"digest {digest!r}: expected {expected} lowercase hex digits")
    return digest


def parse(text: str) -> ImageReference:
    """Parse and normalise an image reference; InvalidArgument says what is wrong with it."""
    if not text:
        raise InvalidArgument("image reference is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidArgument(f"image reference {text!r} contains whitespace")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        validate_digest(digest)
    tag = None
    # A colon after the last slash starts the tag; a colon before it is a registry port.
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"image reference {text!r}: invalid tag {tag!r}")
    domain, path = _split_domain(remainder, text)
    if not _PATH_RE.fullmatch(path):
        raise InvalidArgument(
            f"image reference {text!r}: invalid repository name {path!r} "
            "(lowercase letters, digits and . _ - separators only)"
        )
    if len(domain) + 1 + len(path) > _MAX_NAME_LENGTH:
        raise InvalidArgument(f"image reference {text!r}: name longer than 255 characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest)


def _split_domain(name: str, original: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    is_domain = bool(sep) and ("." in first or ":" in first or first == "localhost")
    if not is_domain:
        domain, path = DOCKER_HUB, name
    else:
        if not _DOMAIN_RE.fullmatch(first):
            raise InvalidArgument(f"image reference {original!r}: invalid registry {first!r}")
        domain, path = first, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def looks_like_image_id(text: str) -> bool:
    """True for ``sha256:<64 hex>`` or a bare 64-hex id, which name an image by its config."""
    bare = text.removeprefix("sha256:")
    return len(bare) == 64 and all(c in "0123456789abcdef" for c in bare)
