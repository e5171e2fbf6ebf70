"""The guest image builder's error."""

from __future__ import annotations

from crivm.errors import CrivmError


class GuestImageError(CrivmError):
    """The guest image could not be built: a package is missing, a download or a check failed."""
